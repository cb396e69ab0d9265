"""Slot assignment for the `tape` policy: a first placement, and replica-count changes in place.

- `dealt_placement` deals replicas to GPUs from scratch: replicas in decreasing load, in rounds
  of G, each round dealt in about the opposite direction of the one before (a "snake", which
  pairs heavy replicas with light ones), over GPUs ordered so that neighbours sit in different
  nodes (an expert's replicas, dealt one after another, land in different nodes).
- `reassign_replicas` changes a placement's replica counts with as few changed slots as possible:
  only the replicas that must go are freed, and each new replica takes the freed slot that
  costs the objective least (tape_state module doc): the lightest GPU, preferring one that held
  the expert before (no weight copy) and a node without the expert (fewer inter-node tokens).
- `keep_previous_slots` orders each GPU's slots so that an expert the GPU held before stays in
  its old slot (the slot does not change at all) and new experts take the slots that left.
- `repair_duplicates` moves the second replica of an expert off a GPU that holds two: a
  previous placement may hold such GPUs (DeepSeek's reference makes them), and refilling may
  be left no other choice in rare corner cases.
"""

from __future__ import annotations

import numpy as np

from tape.layout import Layout
from tape.policies.tape_state import SlotState, gpu_holdings

__all__ = ["dealt_placement", "keep_previous_slots", "reassign_replicas", "repair_duplicates"]


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
    layers = np.asarray(layers, dtype=np.int64)
    num_experts = state.load.shape[1]
    for layer in layers:
        experts = state.experts[layer]
        slot_load = state.slot_load[layer]
        holdings = gpu_holdings(experts[None], num_experts)[0]  # [G, E], kept up to date
        for gpu, expert in np.argwhere(holdings > 1):
            while holdings[gpu, expert] > 1:
                slot = int(np.flatnonzero(experts[gpu] == expert)[-1])
                allowed = (holdings[:, expert] == 0)[:, None] & (holdings[gpu][experts] == 0)
                distance = np.where(allowed, np.abs(slot_load - slot_load[gpu, slot]), np.inf)
                other_gpu, other_slot = np.unravel_index(int(distance.argmin()), distance.shape)
                assert np.isfinite(distance[other_gpu, other_slot]), "k <= E guarantees a partner"
                other = experts[other_gpu, other_slot]
                experts[gpu, slot], experts[other_gpu, other_slot] = other, expert
                slot_load[gpu, slot], slot_load[other_gpu, other_slot] = (
                    slot_load[other_gpu, other_slot], slot_load[gpu, slot])
                holdings[gpu, expert] -= 1
                holdings[other_gpu, expert] += 1
                holdings[other_gpu, other] -= 1
                holdings[gpu, other] += 1
    state.reload_layers(layers)


def _second_replicas(experts: np.ndarray) -> np.ndarray:
    """[L, G, k] bool: slots whose expert sits in an earlier slot of the same GPU."""
    order = np.argsort(experts, axis=2, kind="stable")
    ordered = np.take_along_axis(experts, order, axis=2)
    repeat = np.zeros(experts.shape, dtype=bool)
    repeat[..., 1:] = ordered[..., 1:] == ordered[..., :-1]
    second = np.empty_like(repeat)
    np.put_along_axis(second, order, repeat, axis=2)
    return second


def _slots_to_free(state: SlotState, counts: np.ndarray, second: np.ndarray) -> np.ndarray:
    """[L, S] bool: the slots whose replica goes, for new replica counts `counts`.

    An expert loses `old - new` replicas, and every second replica on one GPU (`second`,
    [L, G, k] bool). Among an expert's slots, those go first that are second replicas, then
    those whose node keeps another replica (no locality lost), then those on heavier GPUs.
    """
    num_layers = state.experts.shape[0]
    experts = state.experts.reshape(num_layers, -1)
    second = second.reshape(num_layers, -1)
    duplicates = np.zeros(counts.shape, dtype=np.int64)
    if second.any():
        np.add.at(duplicates, (np.nonzero(second)[0], experts[second]), 1)
    to_free = np.maximum(state.counts - counts, duplicates)
    freed = np.zeros(experts.shape, dtype=bool)
    layer, slot = np.nonzero(to_free[np.arange(num_layers)[:, None], experts] > 0)
    if not len(layer):
        return freed
    layout = state.layout
    expert = experts[layer, slot]
    gpu = layout.slot_gpu[slot]
    heaviness = state.gpu_load[layer, gpu] / state.gpu_load.max(axis=1)[layer].clip(1e-300)
    preference = (state.node_replicas[layer, layout.slot_node[slot], expert] > 1) + 0.999 * heaviness
    preference = preference + 2.0 * second[layer, slot]
    # Candidates grouped by layer and expert, the preferred first; the first `to_free` go.
    order = np.lexsort((-preference, expert, layer))
    group = layer[order] * counts.shape[1] + expert[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    chosen = order[rank < to_free[layer[order], expert[order]]]
    freed[layer[chosen], slot[chosen]] = True
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
    if np.count_nonzero(state.held) == state.experts.size:
        second = np.zeros(state.experts.shape, dtype=bool)  # no GPU holds an expert twice
    else:
        second = _second_replicas(state.experts)
    freed = _slots_to_free(state, counts, second)
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
    experts[freed] = -1
    state.held[layer_of, layout.slot_gpu[slot_of], gone] = False
    had_duplicates = np.flatnonzero(second.any(axis=(1, 2)))
    if len(had_duplicates):
        state.held[had_duplicates] = gpu_holdings(state.experts[had_duplicates], counts.shape[1]) > 0
    state.counts = counts
    slot_load = np.where(freed, 0.0, np.take_along_axis(per_replica, np.maximum(experts, 0), 1))
    gpu_load = slot_load.reshape(num_layers, num_gpus, per_gpu).sum(axis=2)

    # Only layers with freed slots take part: b indexes them below.
    busy = np.flatnonzero(freed_per_layer)
    free_slots, new_replicas = free_slots[busy], new_replicas[busy]
    pad = free_slots < 0
    free_gpu = layout.slot_gpu[np.maximum(free_slots, 0)]  # [B, W]
    free_node = layout.gpu_node[free_gpu]
    replica = np.maximum(new_replicas, 0)  # [B, W]
    column = busy[:, None, None]
    # cost[b, t, j]: what new replica t adds to the objective in freed slot j, beside the GPU
    # load: a weight copy unless the GPU held the expert before, and the tokens of a node
    # that already holds the expert. Infinite where the GPU already holds it.
    gpu_of, node_of, expert_of = free_gpu[:, None, :], free_node[:, None, :], replica[:, :, None]
    mean = state.mean_gpu_load[busy, None, None]
    cost = np.zeros((len(busy), width, width))
    if state.held_before is not None:
        cost += migration_weight * mean * ~state.held_before[column, gpu_of, expert_of]
    node_charge = (locality_weight * mean / state.total_load[busy, None, None] / layout.num_nodes
                   * state.load[column, expert_of])  # [B, W, 1]
    cost += node_charge * (state.node_replicas[column, node_of, expert_of] > 0)
    blocked = state.held[column, gpu_of, expert_of] | pad[:, None, :]
    same_expert = new_replicas[:, :, None] == new_replicas[:, None, :]  # [B, W, W]
    has_twin = (same_expert.sum(axis=2) > 1) & ~pad  # [B, W]: another new replica, same expert
    taken = pad.copy()
    gpu_load = gpu_load[busy]
    forced = np.zeros(len(busy), dtype=bool)
    for step in range(width):
        expert = new_replicas[:, step]
        active = np.flatnonzero(expert >= 0)
        if not len(active):
            break
        total = gpu_load[active[:, None], free_gpu[active]] + cost[active, step]
        allowed = np.where(blocked[active, step], np.inf, total)
        choice = allowed.argmin(axis=1)
        stuck = ~np.isfinite(allowed[np.arange(len(active)), choice])
        if stuck.any():
            forced[active[stuck]] = True
            fallback = np.where(taken[active], np.inf, total).argmin(axis=1)
            choice = np.where(stuck, fallback, choice)
        gpu = free_gpu[active, choice]
        node = free_node[active, choice]
        taken[active, choice] = True
        blocked[active, :, choice] = True
        twins = np.flatnonzero(has_twin[active, step])
        if len(twins):
            # Later replicas of the same expert: not on this GPU, and charged for this node.
            twin = active[twins]
            later = same_expert[twin, :, step][:, :, None]
            blocked[twin] |= later & (free_gpu[twin] == gpu[twins, None])[:, None, :]
            cost[twin] += np.where(later & (free_node[twin] == node[twins, None])[:, None, :],
                                   node_charge[twin], 0.0)
        layer = busy[active]
        gpu_load[active, gpu] += per_replica[layer, expert[active]]
        experts[layer, free_slots[active, choice]] = expert[active]
        state.held[layer, gpu, expert[active]] = True
        state.node_replicas[layer, node, expert[active]] += 1
    state.refresh_loads(busy)
    if forced.any():
        repair_duplicates(state, busy[forced])


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
