"""Slot assignment for the `tape` policy: a first placement, and replica-count changes in place.

- `dealt_placement` deals replicas to GPUs from scratch: replicas in decreasing load, in rounds
  of G, each round dealt in about the opposite direction of the one before (a "snake", which
  pairs heavy replicas with light ones), over GPUs ordered so that neighbours sit in different
  nodes (an expert's replicas, dealt one after another, land in different nodes).
- `reassign_replicas` changes a placement's replica counts with as few changed slots as possible:
  only the replicas that must go are freed, and each new replica takes the freed slot that
  costs the objective least (tape_state module doc): the lightest GPU, preferring one that held
  the expert before (no weight copy) and a node without the expert (fewer inter-node tokens).
- `repair_duplicates` moves the second replica of an expert off a GPU that holds two: a
  previous placement may hold such GPUs (DeepSeek's reference makes them), and refilling may
  be left no other choice in rare corner cases.
"""

from __future__ import annotations

import numpy as np

from tape.layout import Layout
from tape.policies.tape_state import SlotState, gpu_holdings

__all__ = ["dealt_placement", "reassign_replicas", "repair_duplicates"]


def _dealing_orders(layout: Layout, shift: int) -> np.ndarray:
    """[k, G] int64: the order in which each round deals its replicas to GPUs.

    Round 0 follows the node-interleaved GPUs; every later round reverses the round before (a
    "snake": the GPUs that got the lightest replicas get the heaviest next), rotated by `shift`
    places: an expert whose replicas straddle two rounds, with at most `shift` of them in the
    first, then never has two dealt to one GPU (while its replicas are at most about G / 2).
    """
    num_gpus = layout.num_gpus
    orders = np.empty((layout.slots_per_gpu, num_gpus), dtype=np.int64)
    orders[0] = np.arange(num_gpus).reshape(layout.num_nodes, -1).T.reshape(-1)
    turn = num_gpus - 1 - (np.arange(num_gpus) + shift) % num_gpus
    for round_index in range(1, layout.slots_per_gpu):
        orders[round_index] = orders[round_index - 1][turn]
    return orders


def dealt_placement(load: np.ndarray, counts: np.ndarray, layout: Layout) -> np.ndarray:
    """A first placement: replicas dealt to GPUs in snake order (module doc).

    Args:
        load: [L, E] float64 forecast tokens per expert.
        counts: [L, E] int64 replicas per expert, in [1, G], each layer summing to S.
        layout: the cluster.

    Returns:
        experts: [L, G, k] int64. No GPU holds two replicas of an expert, unless an expert has
        more than about G / 2 replicas (then `repair_duplicates` fixes it).
    """
    num_layers, num_experts = load.shape
    num_gpus, per_gpu = layout.num_gpus, layout.slots_per_gpu
    replica_expert = np.repeat(
        np.tile(np.arange(num_experts), num_layers), counts.reshape(-1)
    ).reshape(num_layers, -1)
    replica_load = np.take_along_axis(load / counts, replica_expert, axis=1)
    order = np.argsort(-replica_load, axis=1, kind="stable")
    dealt = np.take_along_axis(replica_expert, order, axis=1).reshape(num_layers, per_gpu, num_gpus)
    orders = _dealing_orders(layout, int(counts.max()) - 1)
    experts = np.empty((num_layers, num_gpus, per_gpu), dtype=np.int64)
    experts[:, orders, np.arange(per_gpu)[:, None]] = dealt
    return experts


def repair_duplicates(state: SlotState, layers: np.ndarray) -> None:
    """Give every GPU of `layers` at most one replica of each expert, by swaps.

    A duplicate replica swaps with the slot of another GPU whose load is closest to its own,
    among slots whose expert is not on the duplicate's GPU, on GPUs without the duplicated
    expert. Such a slot exists whenever k <= E (slots per GPU at most the experts).
    """
    num_experts = state.load.shape[1]
    for layer in np.asarray(layers, dtype=np.int64):
        experts = state.experts[layer]
        slot_load = state.slot_load[layer]
        while True:
            holdings = gpu_holdings(experts[None], num_experts)[0]
            doubled = np.argwhere(holdings > 1)
            if not len(doubled):
                break
            gpu, expert = doubled[0]
            slot = int(np.flatnonzero(experts[gpu] == expert)[-1])
            allowed = (holdings[:, expert] == 0)[:, None] & (holdings[gpu][experts] == 0)
            distance = np.where(allowed, np.abs(slot_load - slot_load[gpu, slot]), np.inf)
            other_gpu, other_slot = np.unravel_index(int(distance.argmin()), distance.shape)
            assert np.isfinite(distance[other_gpu, other_slot]), "k <= E guarantees a partner"
            experts[gpu, slot], experts[other_gpu, other_slot] = (
                experts[other_gpu, other_slot], experts[gpu, slot])
            slot_load[gpu, slot], slot_load[other_gpu, other_slot] = (
                slot_load[other_gpu, other_slot], slot_load[gpu, slot])
    state.reload_layers(np.asarray(layers, dtype=np.int64))


def _slots_to_free(state: SlotState, counts: np.ndarray) -> np.ndarray:
    """[L, S] bool: the slots whose replica goes, for new replica counts `counts`.

    An expert loses `old - new` replicas, and every second replica on one GPU. Among an
    expert's slots, those go first that are duplicates, then those whose node keeps another
    replica (no locality lost), then those on heavier GPUs.
    """
    num_layers = state.experts.shape[0]
    experts = state.experts.reshape(num_layers, -1)
    duplicates = state.counts - state.held.sum(axis=1)  # [L, E] second replicas on a GPU
    to_free = np.maximum(state.counts - counts, duplicates)
    freed = np.zeros(experts.shape, dtype=bool)
    if not to_free.any():
        return freed
    rows = np.arange(num_layers)[:, None]
    slot_node = state.layout.slot_node[None, :]
    node_keeps_one = state.node_replicas[rows, slot_node, experts] > 1
    heaviness = state.gpu_load / np.maximum(state.gpu_load.max(axis=1, keepdims=True), 1e-300)
    preference = 1.0 * node_keeps_one + 0.999 * heaviness[:, state.layout.slot_gpu]
    if duplicates.any():
        same = state.experts[:, :, :, None] == state.experts[:, :, None, :]
        preference += 2.0 * np.tril(same, k=-1).any(axis=3).reshape(num_layers, -1)

    # Slots grouped by expert, the preferred first (preference < 4 fits in the fraction).
    order = np.argsort(experts + (4.0 - preference) / 4.0, axis=1, kind="stable")
    sorted_experts = np.take_along_axis(experts, order, axis=1)
    first = np.cumsum(state.counts, axis=1) - state.counts
    rank = np.arange(experts.shape[1])[None, :] - np.take_along_axis(first, sorted_experts, axis=1)
    np.put_along_axis(freed, order, rank < np.take_along_axis(to_free, sorted_experts, axis=1), 1)
    return freed


def reassign_replicas(
    state: SlotState, counts: np.ndarray, *, migration_weight: float, locality_weight: float
) -> None:
    """Change the state's replica counts to `counts`, freeing and refilling slots (module doc).

    Args:
        state: the placement to change, in place.
        counts: [L, E] int64 new replica counts, each in [1, G], each layer summing to S.
        migration_weight: charge per weight copy, in units of the layer's mean GPU load.
        locality_weight: charge per inter-node token, relative to the layer's total load.
    """
    num_layers, num_gpus, per_gpu = state.experts.shape
    freed = _slots_to_free(state, counts)
    if not freed.any():
        state.counts = counts
        state.refresh_loads()
        return
    layout = state.layout
    num_slots = num_gpus * per_gpu
    experts = state.experts.reshape(num_layers, num_slots)
    rows = np.arange(num_layers)[:, None]

    # New replicas per layer, heaviest first; freed slots per layer; both padded with -1.
    kept = state.counts.copy()
    np.add.at(kept, (np.broadcast_to(rows, experts.shape)[freed], experts[freed]), -1)
    added = counts - kept
    assert np.all(added >= 0)
    freed_per_layer = freed.sum(axis=1)
    width = int(freed_per_layer.max())
    free_slots = np.full((num_layers, width), -1, dtype=np.int64)
    layer_of, slot_of = np.nonzero(freed)
    free_slots[layer_of, (np.cumsum(freed, axis=1) - 1)[layer_of, slot_of]] = slot_of
    new_layer, new_expert = np.nonzero(added)
    repeats = added[new_layer, new_expert]
    new_layer, new_expert = np.repeat(new_layer, repeats), np.repeat(new_expert, repeats)
    start = np.cumsum(freed_per_layer) - freed_per_layer
    new_replicas = np.full((num_layers, width), -1, dtype=np.int64)
    new_replicas[new_layer, np.arange(len(new_layer)) - start[new_layer]] = new_expert
    per_replica = state.load / counts
    new_load = np.where(new_replicas >= 0,
                        np.take_along_axis(per_replica, np.maximum(new_replicas, 0), axis=1), -1.0)
    heaviest_first = np.argsort(-new_load, axis=1, kind="stable")
    new_replicas = np.take_along_axis(new_replicas, heaviest_first, axis=1)

    # Empty the freed slots; loads of the kept slots use the new counts.
    gone = experts[layer_of, slot_of]
    np.add.at(state.node_replicas, (layer_of, layout.slot_node[slot_of], gone), -1)
    had_duplicates = np.flatnonzero((state.held.sum(axis=1) < state.counts).any(axis=1))
    experts[freed] = -1
    state.held[layer_of, layout.slot_gpu[slot_of], gone] = False
    if len(had_duplicates):
        state.held[had_duplicates] = gpu_holdings(state.experts[had_duplicates], counts.shape[1]) > 0
    state.counts = counts
    slot_load = np.where(freed, 0.0, np.take_along_axis(per_replica, np.maximum(experts, 0), 1))
    gpu_load = slot_load.reshape(num_layers, num_gpus, per_gpu).sum(axis=2)

    mean = state.mean_gpu_load[:, None]
    copy_charge = migration_weight * mean  # [L, 1] tokens per weight copy
    node_charge = locality_weight * mean / state.total_load[:, None] / layout.num_nodes
    free_gpu = np.where(free_slots >= 0, layout.slot_gpu[np.maximum(free_slots, 0)], 0)
    free_node = layout.gpu_node[free_gpu]
    taken = free_slots < 0
    forced = np.zeros(num_layers, dtype=bool)
    for step in range(width):
        expert = new_replicas[:, step]
        active = np.flatnonzero(expert >= 0)
        if not len(active):
            break
        expert = expert[active, None]
        gpus = free_gpu[active]
        cost = gpu_load[active[:, None], gpus]
        if state.held_before is not None:
            cost = cost + copy_charge[active] * ~state.held_before[active[:, None], gpus, expert]
        node_has = state.node_replicas[active[:, None], free_node[active], expert] > 0
        cost = cost + node_charge[active] * state.load[active[:, None], expert] * node_has
        cost = np.where(taken[active], np.inf, cost)
        feasible = np.where(state.held[active[:, None], gpus, expert], np.inf, cost)
        choice = feasible.argmin(axis=1)
        stuck = ~np.isfinite(feasible[np.arange(len(active)), choice])
        choice = np.where(stuck, cost.argmin(axis=1), choice)
        forced[active[stuck]] = True
        slot = free_slots[active, choice]
        gpu = layout.slot_gpu[slot]
        expert = expert[:, 0]
        taken[active, choice] = True
        experts[active, slot] = expert
        gpu_load[active, gpu] += per_replica[active, expert]
        state.held[active, gpu, expert] = True
        state.node_replicas[active, layout.gpu_node[gpu], expert] += 1
    state.refresh_loads()
    if forced.any():
        repair_duplicates(state, np.flatnonzero(forced))
