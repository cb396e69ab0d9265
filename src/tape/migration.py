"""Weight migration between two consecutive placements: what a rebalance costs to carry out.

A slot whose expert changes must receive that expert's weights from the nearest GPU that held
the expert in the previous placement:

    local    its own GPU held it (a copy within the GPU, free),
    NVLink   else a GPU of its node held it,
    IB       else only GPUs of other nodes held it (an InfiniBand copy).

Each slot is counted on its own, as the SPEC reads: two new slots of one expert on one GPU make
two copies. Bytes per copy are `ModelSpec.bytes_per_expert`. All copies of a rebalance (every
layer) run at once; each GPU receives its NVLink and InfiniBand bytes in parallel, each link at
its per-GPU bandwidth, and the rebalance takes as long as its busiest receiving GPU:

    seconds = max over GPUs g of max(NVLink bytes into g / NVLink bandwidth,
                                     IB bytes into g / IB bandwidth),   bytes summed over layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tape.errors import PlacementError
from tape.layout import Layout
from tape.placement import Placement
from tape.presets import ClusterSpec, ModelSpec

__all__ = ["Migration", "migration"]


@dataclass(frozen=True)
class Migration:
    """The weight copies of one rebalance, per layer and receiving GPU.

    Attributes:
        local_copies: int64 [L, G], changed slots of each GPU whose expert it already held.
        nvlink_copies: int64 [L, G], changed slots filled from another GPU of the node.
        ib_copies: int64 [L, G], changed slots filled from another node.
        nvlink_bytes: float64 [L, G], bytes each GPU receives over NVLink.
        ib_bytes: float64 [L, G], bytes each GPU receives over InfiniBand.
        seconds: time of the whole rebalance, set by the busiest receiving GPU (module docstring).
    """

    local_copies: np.ndarray
    nvlink_copies: np.ndarray
    ib_copies: np.ndarray
    nvlink_bytes: np.ndarray
    ib_bytes: np.ndarray
    seconds: float

    @property
    def changed_slots(self) -> np.ndarray:
        """int64 [L, G]: slots of each GPU whose expert changed."""
        return self.local_copies + self.nvlink_copies + self.ib_copies

    @property
    def moved_experts(self) -> np.ndarray:
        """int64 [L, G]: copies that cross a link (NVLink + InfiniBand)."""
        return self.nvlink_copies + self.ib_copies


def _check_pair(previous: Placement, current: Placement, layout: Layout) -> None:
    previous.validate(layout)
    current.validate(layout)
    if previous.phy2log.shape != current.phy2log.shape:
        raise PlacementError(
            f"previous placement has shape {previous.phy2log.shape} (layers, slots), the current "
            f"one {current.phy2log.shape}; expected the same"
        )
    if previous.num_experts != current.num_experts:
        raise PlacementError(
            f"previous placement has {previous.num_experts} experts, the current one "
            f"{current.num_experts}; expected the same"
        )


def migration(
    previous: Placement,
    current: Placement,
    layout: Layout,
    model: ModelSpec,
    cluster: ClusterSpec,
) -> Migration:
    """The weight copies that turn `previous` into `current`, with their bytes and seconds.

    Args:
        previous: the placement in force before the rebalance; must fit `layout`.
        current: the new placement, same layers, slots and experts.
        layout: the cluster: slot s on GPU s // k, GPU g on node g // (G / N).
        model: gives the bytes of one expert's weights (the trace's shape need not match it).
        cluster: gives the per-GPU NVLink and InfiniBand bandwidths (bytes/s).

    Returns:
        The `Migration`, per layer and receiving GPU.
    """
    _check_pair(previous, current, layout)
    num_layers, num_slots = current.phy2log.shape
    num_gpus = layout.num_gpus
    held = previous.replicas_per_gpu(num_gpus) > 0
    node_held = held.reshape(num_layers, layout.num_nodes, layout.gpus_per_node, -1).any(axis=2)

    layers = np.arange(num_layers)[:, None]
    expert = current.phy2log
    changed = expert != previous.phy2log
    local = changed & held[layers, layout.slot_gpu[None, :], expert]
    nvlink = changed & ~local & node_held[layers, layout.slot_node[None, :], expert]
    ib = changed & ~local & ~nvlink

    def per_gpu(slots: np.ndarray) -> np.ndarray:
        return slots.reshape(num_layers, num_gpus, num_slots // num_gpus).sum(axis=2)

    nvlink_bytes = per_gpu(nvlink) * model.bytes_per_expert
    ib_bytes = per_gpu(ib) * model.bytes_per_expert
    gpu_seconds = np.maximum(
        nvlink_bytes.sum(axis=0) / cluster.nvlink_bandwidth,
        ib_bytes.sum(axis=0) / cluster.ib_bandwidth,
    )
    return Migration(
        local_copies=per_gpu(local),
        nvlink_copies=per_gpu(nvlink),
        ib_copies=per_gpu(ib),
        nvlink_bytes=nvlink_bytes,
        ib_bytes=ib_bytes,
        seconds=float(gpu_seconds.max()),
    )
