"""Matching a new placement to the previous one, so that as few weights as possible move.

A placement's quality does not change when whole nodes trade places, or GPUs within a node
(loads stay, and so does each expert's set of nodes). `relabel_like` picks, per layer, the
node and GPU renaming that leaves the most experts on a GPU that already holds them: GPUs are
matched within every pair of nodes (an assignment problem of G/N GPUs), then nodes are matched
on those totals (an assignment problem of N nodes), with the experts two nodes share breaking
ties (an NVLink copy rather than an InfiniBand one).

`keep_previous_slots` then orders each GPU's slots so that an expert the GPU held before stays
in its old slot (the slot does not change at all) and new experts take the slots that left.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from tape.layout import Layout
from tape.policies.tape_state import gpu_holdings

__all__ = ["keep_previous_slots", "relabel_like"]


def relabel_like(experts: np.ndarray, previous: np.ndarray, layout: Layout) -> np.ndarray:
    """`experts` with nodes and GPUs renamed per layer to overlap `previous` most (module doc).

    Args:
        experts: [L, G, k] int64, the new placement.
        previous: [L, G, k] int64, the placement in force.
        layout: the cluster.

    Returns:
        [L, G, k] int64, the same placement per layer up to a renaming of nodes and of GPUs
        within nodes.
    """
    num_layers, num_gpus, _ = experts.shape
    num_experts = int(max(experts.max(), previous.max())) + 1
    nodes, per_node = layout.num_nodes, layout.gpus_per_node
    new_held = (gpu_holdings(experts, num_experts) > 0).astype(np.int64)
    old_held = (gpu_holdings(previous, num_experts) > 0).astype(np.int64)
    overlap = np.einsum("lae,lbe->lab", new_held, old_held)  # [L, G, G] shared experts
    new_node = new_held.reshape(num_layers, nodes, per_node, -1).any(axis=2).astype(np.int64)
    old_node = old_held.reshape(num_layers, nodes, per_node, -1).any(axis=2).astype(np.int64)
    node_overlap = np.einsum("lme,lne->lmn", new_node, old_node)  # [L, N, N]
    tie_scale = 1.0 / (num_experts * num_gpus + 1)
    relabelled = np.empty_like(experts)
    for layer in range(num_layers):
        blocks = overlap[layer].reshape(nodes, per_node, nodes, per_node).transpose(0, 2, 1, 3)
        matches = {}
        node_value = np.empty((nodes, nodes))
        for new in range(nodes):
            for old in range(nodes):
                row, column = linear_sum_assignment(blocks[new, old], maximize=True)
                matches[new, old] = column
                node_value[new, old] = (blocks[new, old][row, column].sum()
                                        + tie_scale * node_overlap[layer, new, old])
        new_nodes, old_nodes = linear_sum_assignment(node_value, maximize=True)
        for new, old in zip(new_nodes, old_nodes):
            targets = old * per_node + matches[new, old]
            relabelled[layer, targets] = experts[layer, new * per_node: (new + 1) * per_node]
    return relabelled


def keep_previous_slots(
    experts: np.ndarray, previous: np.ndarray, held_before: np.ndarray
) -> np.ndarray:
    """`experts` with each GPU's slots reordered to keep experts in their previous slots.

    Args:
        experts: [L, G, k] int64, the new placement (no expert twice on a GPU).
        previous: [L, G, k] int64, the placement in force (may hold an expert twice on a GPU).
        held_before: [L, G, E] bool, whether each GPU holds each expert in `previous`.

    Returns:
        [L, G, k] int64 with the same experts on every GPU: an expert the GPU held before sits
        in the first slot where it sat; the GPU's new experts fill its other slots in order.
    """
    num_layers, num_gpus, per_gpu = experts.shape
    result = experts.copy()
    layer_index = np.arange(num_layers)[:, None, None]
    gpu_index = np.arange(num_gpus)[None, :, None]
    # Only a GPU with an expert in a slot other than its old one needs reordering.
    misplaced = (experts != previous) & held_before[layer_index, gpu_index, experts]
    changed = misplaced.any(axis=2)
    if not changed.any():
        return result
    new, old = experts[changed], previous[changed]  # [n, k]
    same_old = old[:, :, None] == old[:, None, :]
    first_of_its_expert = ~np.tril(same_old, k=-1).any(axis=2)
    kept_slot = first_of_its_expert & (old[:, :, None] == new[:, None, :]).any(axis=2)
    arrives = ~(new[:, :, None] == old[:, None, :]).any(axis=2)
    # Arriving experts in their current order, then the kept ones (unused); free slots first.
    arrivals = np.take_along_axis(new, np.argsort(~arrives, axis=1, kind="stable"), axis=1)
    free_first = np.argsort(kept_slot, axis=1, kind="stable")
    rank = np.empty_like(free_first)
    np.put_along_axis(rank, free_first, np.broadcast_to(np.arange(per_gpu), free_first.shape), 1)
    result[changed] = np.where(kept_slot, old, np.take_along_axis(arrivals, rank, axis=1))
    return result
