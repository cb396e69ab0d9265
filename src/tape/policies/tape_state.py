"""The `tape` policy's working placement: slots, loads and bookkeeping for all layers at once.

A `SlotState` holds a placement under construction as `experts[L, G, k]` (the expert in slot i
of GPU g) together with what the search needs at every step without recounting: each slot's and
GPU's forecast load, which GPU holds which expert, how many replicas of each expert each node
holds, and which GPU held which expert in the previous placement (for the migration charge).

Objective (per layer, in units of the layer's mean GPU load M; F is the layer's total load):

    max GPU load / M  +  migration_weight * moved experts  +  locality_weight * IB tokens / F

where a moved expert is a slot whose GPU did not hold its expert before (a weight copy over
NVLink or InfiniBand) and IB tokens are those locality dispatch sends across nodes: expert e
with replicas in n_e of the N nodes sends `load[e] * (N - n_e) / N` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tape.layout import Layout

__all__ = ["SlotState", "gpu_holdings"]


def gpu_holdings(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, G, E] int64: replicas of each expert on each GPU, from `experts[L, G, k]`.

    Empty slots (expert -1) count for nothing.
    """
    num_layers, num_gpus, _ = experts.shape
    index = (np.arange(num_layers * num_gpus).reshape(num_layers, num_gpus, 1) * num_experts
             + np.maximum(experts, 0)).reshape(-1)
    counts = np.bincount(index, weights=(experts >= 0).reshape(-1),
                         minlength=num_layers * num_gpus * num_experts)
    return counts.astype(np.int64).reshape(num_layers, num_gpus, num_experts)


def _held(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, G, E] bool: the GPU holds the expert, from `experts[L, G, k]`."""
    num_layers, num_gpus, _ = experts.shape
    held = np.zeros((num_layers, num_gpus, num_experts), dtype=bool)
    held[np.arange(num_layers)[:, None, None], np.arange(num_gpus)[None, :, None], experts] = True
    return held


def _node_replicas(experts: np.ndarray, num_experts: int, layout: Layout) -> np.ndarray:
    """[L, N, E] int64: replicas of each expert in each node, from `experts[L, G, k]`."""
    num_layers = experts.shape[0]
    node = np.repeat(layout.gpu_node, layout.slots_per_gpu)
    index = ((np.arange(num_layers)[:, None] * layout.num_nodes + node) * num_experts
             + experts.reshape(num_layers, -1)).reshape(-1)
    counts = np.bincount(index, minlength=num_layers * layout.num_nodes * num_experts)
    return counts.reshape(num_layers, layout.num_nodes, num_experts)


@dataclass
class SlotState:
    """A placement under construction (module doc), batched over layers.

    Attributes:
        layout: the cluster.
        load: [L, E] float64 forecast tokens per expert.
        experts: [L, G, k] int64, the expert of each slot.
        counts: [L, E] int64, replicas of each expert.
        slot_load: [L, G, k] float64, `load[e] / counts[e]` of each slot's expert e.
        gpu_load: [L, G] float64, the sum of each GPU's slot loads.
        held: [L, G, E] bool, the GPU holds the expert.
        node_replicas: [L, N, E] int64, replicas of the expert on the node's GPUs.
        held_before: [L, G, E] bool, the GPU held the expert in the previous placement, or None.
    """

    layout: Layout
    load: np.ndarray
    experts: np.ndarray
    counts: np.ndarray
    slot_load: np.ndarray
    gpu_load: np.ndarray
    held: np.ndarray
    node_replicas: np.ndarray
    held_before: np.ndarray | None

    @classmethod
    def build(
        cls,
        load: np.ndarray,
        experts: np.ndarray,
        layout: Layout,
        held_before: np.ndarray | None = None,
    ) -> SlotState:
        """The state of placement `experts[L, G, k]` under forecast `load[L, E]`."""
        num_experts = load.shape[1]
        node_replicas = _node_replicas(experts, num_experts, layout)
        state = cls(
            layout=layout,
            load=load,
            experts=experts,
            counts=node_replicas.sum(axis=1),
            slot_load=np.empty(experts.shape),
            gpu_load=np.empty(experts.shape[:2]),
            held=_held(experts, num_experts),
            node_replicas=node_replicas,
            held_before=held_before,
        )
        state.refresh_loads()
        return state

    @property
    def mean_gpu_load(self) -> np.ndarray:
        """[L] float64, M: each layer's total forecast load / G (never 0: 1.0 for an idle layer)."""
        mean = self.load.sum(axis=1) / self.layout.num_gpus
        return np.where(mean > 0, mean, 1.0)

    @property
    def total_load(self) -> np.ndarray:
        """[L] float64, F: each layer's total forecast load (never 0: 1.0 for an idle layer)."""
        total = self.load.sum(axis=1)
        return np.where(total > 0, total, 1.0)

    def refresh_loads(self, layers: np.ndarray | None = None) -> None:
        """Recompute slot and GPU loads (of `layers`, default all) from `load` and `counts`."""
        if layers is None:
            layers = np.arange(self.experts.shape[0])
        per_replica = self.load[layers] / np.maximum(self.counts[layers], 1)
        experts = self.experts[layers]
        slots = np.take_along_axis(per_replica, experts.reshape(len(layers), -1), axis=1)
        self.slot_load[layers] = slots.reshape(experts.shape)
        self.gpu_load[layers] = self.slot_load[layers].sum(axis=2)

    def swap(
        self,
        layers: np.ndarray,
        first_gpu: np.ndarray,
        first_slot: np.ndarray,
        second_gpu: np.ndarray,
        second_slot: np.ndarray,
    ) -> None:
        """Exchange the experts of two slots on different GPUs, one pair per entry of `layers`.

        A layer may appear several times, but no GPU twice within a layer, and neither expert
        may already be on the other's GPU.
        """
        first = self.experts[layers, first_gpu, first_slot]
        second = self.experts[layers, second_gpu, second_slot]
        first_load = self.slot_load[layers, first_gpu, first_slot]
        second_load = self.slot_load[layers, second_gpu, second_slot]
        self.experts[layers, first_gpu, first_slot] = second
        self.experts[layers, second_gpu, second_slot] = first
        self.slot_load[layers, first_gpu, first_slot] = second_load
        self.slot_load[layers, second_gpu, second_slot] = first_load
        self.gpu_load[layers, first_gpu] += second_load - first_load
        self.gpu_load[layers, second_gpu] += first_load - second_load
        self.held[layers, first_gpu, first] = False
        self.held[layers, second_gpu, second] = False
        self.held[layers, first_gpu, second] = True
        self.held[layers, second_gpu, first] = True
        # Two swaps of one layer may move replicas of one expert out of (or into) one node.
        first_node = self.layout.gpu_node[first_gpu]
        second_node = self.layout.gpu_node[second_gpu]
        np.add.at(self.node_replicas, (layers, first_node, first), -1)
        np.add.at(self.node_replicas, (layers, second_node, first), 1)
        np.add.at(self.node_replicas, (layers, second_node, second), -1)
        np.add.at(self.node_replicas, (layers, first_node, second), 1)

    def reload_layers(self, layers: np.ndarray) -> None:
        """Recompute holdings, node replicas and loads of `layers` after editing `experts`."""
        experts = self.experts[layers]
        self.held[layers] = _held(experts, self.load.shape[1])
        self.node_replicas[layers] = _node_replicas(experts, self.load.shape[1], self.layout)
        self.refresh_loads(layers)
