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

Flat indices: the modules of the policy address every array through one integer per entry, which
numpy gathers and scatters much faster than tuples of index arrays. GPU g of layer l is GPU
`l * G + g` of all layers, slot i of it slot `(l * G + g) * k + i`, and its node
`(l * G + g) // (G / N) = l * N + g // (G / N)`; `held` and `held_before` are addressed by
`gpu * E + expert`, `node_replicas` by `node * E + expert`, `load` and `counts` by
`layer * E + expert`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tape.layout import Layout

__all__ = ["SlotState", "slot_indices"]


@lru_cache(maxsize=16)
def slot_indices(num_layers: int, layout: Layout, num_experts: int) -> tuple[np.ndarray, ...]:
    """[L * S] int64 arrays, read-only, for every flat slot: its flat GPU, and the flat index of
    expert 0 in an [L, E] array (`layer * E`), in `held` (`gpu * E`) and in `node_replicas`
    (`node * E`): add the slot's expert to get the entry of that expert."""
    slot = np.arange(num_layers * layout.num_replicas)
    gpu = slot // layout.slots_per_gpu
    indices = (gpu, slot // layout.num_replicas * num_experts, gpu * num_experts,
               gpu // layout.gpus_per_node * num_experts)
    for array in indices:
        array.flags.writeable = False
    return indices


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
        mean_gpu_load: [L] float64, M: each layer's total load / G (1.0 for an idle layer).
        total_load: [L] float64, F: each layer's total load (1.0 for an idle layer).
        slot_gpu, slot_layer, slot_held, slot_node: [L * S] int64, read-only, for each flat
            slot: its flat GPU, and the flat index of expert 0 of its layer in [L, E] arrays,
            of its GPU in `held`, of its node in `node_replicas` (`slot_indices`).
        duplicates: some GPU held two replicas of one expert when the state was built.
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
    mean_gpu_load: np.ndarray
    total_load: np.ndarray
    slot_gpu: np.ndarray
    slot_layer: np.ndarray
    slot_held: np.ndarray
    slot_node: np.ndarray
    duplicates: bool

    @classmethod
    def build(
        cls,
        load: np.ndarray,
        experts: np.ndarray,
        layout: Layout,
        *,
        in_force: bool = False,
    ) -> SlotState:
        """The state of placement `experts[L, G, k]` (no -1) under forecast `load[L, E]`.

        With `in_force` (the placement is the one in force), `held_before` is its holdings.
        """
        num_layers, num_experts = load.shape
        slot_gpu, slot_layer, slot_held, slot_node = slot_indices(num_layers, layout, num_experts)
        flat = experts.reshape(-1)
        total = load.sum(axis=1)
        state = cls(
            layout=layout,
            load=load,
            experts=experts,
            counts=np.bincount(slot_layer + flat, minlength=load.size).reshape(load.shape),
            slot_load=np.empty(experts.shape),
            gpu_load=np.empty((num_layers, layout.num_gpus)),
            held=np.zeros((num_layers, layout.num_gpus, num_experts), dtype=bool),
            node_replicas=np.empty((num_layers, layout.num_nodes, num_experts), dtype=np.int64),
            held_before=None,
            mean_gpu_load=np.where(total > 0, total / layout.num_gpus, 1.0),
            total_load=np.where(total > 0, total, 1.0),
            slot_gpu=slot_gpu,
            slot_layer=slot_layer,
            slot_held=slot_held,
            slot_node=slot_node,
            duplicates=False,
        )
        state.reload()
        state.duplicates = int(np.count_nonzero(state.held)) < experts.size
        if in_force:
            # A fresh scatter: much cheaper than copying `held` (most of it is never touched).
            held_before = np.zeros(state.held.size, dtype=bool)
            held_before[slot_held + flat] = True
            state.held_before = held_before.reshape(state.held.shape)
        return state

    def reload(self, layers: np.ndarray | None = None) -> None:
        """Recompute holdings, node replicas and loads of `layers` (default all) from `experts`
        (no -1) and `counts`."""
        slots = slice(None)
        if layers is not None:
            self.held[layers] = False
            self.node_replicas[layers] = 0
            slots = (layers[:, None] * self.layout.num_replicas
                     + np.arange(self.layout.num_replicas)).reshape(-1)
        experts = self.experts.reshape(-1)[slots]
        self.held.reshape(-1)[self.slot_held[slots] + experts] = True
        node = self.slot_node[slots] + experts
        if layers is None:
            self.node_replicas = np.bincount(node, minlength=self.node_replicas.size).reshape(
                self.node_replicas.shape)
        else:
            np.add.at(self.node_replicas.reshape(-1), node, 1)
        self.refresh_loads()

    def refresh_loads(self) -> None:
        """Recompute every slot and GPU load from `load` and `counts` (no empty slot)."""
        per_replica = (self.load / self.counts).reshape(-1)
        slot_load = per_replica[self.slot_layer + self.experts.reshape(-1)]
        self.slot_load = slot_load.reshape(self.experts.shape)
        self.gpu_load = (slot_load.reshape(-1, self.layout.slots_per_gpu)
                         @ np.ones(self.layout.slots_per_gpu)).reshape(self.gpu_load.shape)

    def swap(self, first_slot: np.ndarray, second_slot: np.ndarray) -> None:
        """Exchange the experts of pairs of slots (flat slot indices) on different GPUs.

        No GPU may appear in two pairs, and neither expert of a pair may already be on the
        other's GPU.
        """
        experts = self.experts.reshape(-1)
        slot_load = self.slot_load.reshape(-1)
        first, second = experts[first_slot], experts[second_slot]
        experts[first_slot], experts[second_slot] = second, first
        first_load, second_load = slot_load[first_slot], slot_load[second_slot]
        slot_load[first_slot], slot_load[second_slot] = second_load, first_load
        shift = first_load - second_load
        gpu_load = self.gpu_load.reshape(-1)
        gpu_load[self.slot_gpu[first_slot]] -= shift
        gpu_load[self.slot_gpu[second_slot]] += shift
        held = self.held.reshape(-1)
        first_held, second_held = self.slot_held[first_slot], self.slot_held[second_slot]
        held[first_held + first] = False
        held[second_held + second] = False
        held[first_held + second] = True
        held[second_held + first] = True
        # Two swaps of one layer may move replicas of one expert out of (or into) one node.
        first_node, second_node = self.slot_node[first_slot], self.slot_node[second_slot]
        node_replicas = self.node_replicas.reshape(-1)
        np.subtract.at(node_replicas, np.concatenate([first_node + first, second_node + second]), 1)
        np.add.at(node_replicas, np.concatenate([second_node + first, first_node + second]), 1)
