"""`replicate-hot`: the seed's simple replication, with equal slot counts per GPU.

Every GPU keeps its vanilla experts (expert e on GPU e // (E / G)) and gets `k` extra slots,
so S = E + k * G. The seed copied each of the k hottest experts to every GPU except its home,
which leaves the GPUs that home hot experts with fewer slots. Here every GPU fills its k extra
slots with the hottest experts it does not home: the k hottest experts are then on every GPU,
and a GPU that homes some of them takes the next hottest experts in the slots left over. No GPU
holds two replicas of an expert. An expert's home slot is its primary replica.

`k` is the spare slots per GPU, S / G - E / G: the cluster fixes it.
"""

from __future__ import annotations

import numpy as np

from tape.layout import Layout
from tape.placement import Placement
from tape.policies import PolicyError, register
from tape.policies.packing import descending_order, placement_from_ranks, replica_ranks
from tape.policies.vanilla import home_slots

__all__ = ["replicate_hot"]


@register("replicate-hot")
def replicate_hot(weight: np.ndarray, layout: Layout) -> Placement:
    """Vanilla plus copies of the hottest experts on every GPU.

    Args:
        weight: [L, E] float64, each expert's load; E must be a multiple of G.
        layout: the cluster; S must be E + k * G for a k >= 0 (S / G - E / G extra slots a GPU).

    Returns:
        Placement with each expert's home slot first in `log2phy`.
    """
    num_layers, num_experts = weight.shape
    num_gpus = layout.num_gpus
    own_per_gpu, spare = home_slots(num_experts, layout,
                                    "replicate-hot keeps the vanilla placement")
    if spare > num_experts - own_per_gpu:
        raise PolicyError(
            f"replicate-hot needs k ({spare}) distinct experts from other GPUs for each GPU, "
            f"but only {num_experts - own_per_gpu} are not homed on it"
        )

    # The first k + E/G hottest experts hold the k hottest that a GPU does not home.
    candidates = descending_order(weight)[:, : spare + own_per_gpu]  # [L, k + E/G]
    home = candidates // own_per_gpu
    gpu = np.arange(num_gpus)[None, :, None]
    eligible = home[:, None, :] != gpu  # [L, G, T]
    chosen = eligible & (np.cumsum(eligible, axis=2) <= spare)
    layers, _, position = np.nonzero(chosen)  # k per (layer, GPU), in GPU then hotness order
    copies = candidates[layers, position].reshape(num_layers, num_gpus, spare)
    own = np.broadcast_to(
        np.arange(num_experts).reshape(1, num_gpus, own_per_gpu),
        (num_layers, num_gpus, own_per_gpu),
    )
    phy2log = np.concatenate([own, copies], axis=2).reshape(num_layers, -1)
    is_copy = np.broadcast_to(
        np.arange(layout.slots_per_gpu) >= own_per_gpu, (num_layers, num_gpus, layout.slots_per_gpu)
    ).reshape(num_layers, -1)
    rank = replica_ranks(phy2log, num_experts, is_copy.astype(np.int64))
    return placement_from_ranks(phy2log, rank, num_experts)
