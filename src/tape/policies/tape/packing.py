"""Slot assignment for the `tape` policy: a first placement, and replica-count changes in place.

- `packed_placement` packs replicas from scratch by DeepSeek's greedy (each replica, heaviest
  first, to the lightest GPU with room that holds fewest replicas of its expert), over GPUs
  ordered so that neighbours sit in different nodes (an expert's replicas, packed one after
  another, land in different nodes): a finer balance than dealing them in fixed rounds (a
  "snake", which the tests keep as a reference) when the replicas' loads are uneven.
- `reassign_replicas` changes a placement's replica counts with as few changed slots as possible:
  only the replicas that must go are freed, and each new replica takes the freed slot that
  costs the objective least (`state` module doc): the lightest GPU, preferring one that held
  the expert before (no weight copy) and a node without the expert (fewer inter-node tokens).
- `keep_previous_slots` orders each GPU's slots so that an expert the GPU held before stays in
  its old slot (the slot does not change at all) and new experts take the slots that left.
- `repair_duplicates` moves the second replica of an expert off a GPU that holds two: a
  previous placement may hold such GPUs (DeepSeek's reference makes them), and refilling may
  be left no other choice in rare corner cases.

Arrays are addressed by flat indices (`state` module doc).
"""

from __future__ import annotations

import numpy as np

from tape.layout import Layout
from tape.policies.packing import (
    balanced_packing,
    expert_major_replicas,
    spread_replicas,
    take_rows,
)
from tape.policies.tape.state import SlotState

__all__ = [
    "keep_previous_slots",
    "node_interleaved",
    "packed_placement",
    "reassign_replicas",
    "repair_duplicates",
    "second_replicas",
]


def node_interleaved(layout: Layout) -> np.ndarray:
    """[G] int64: the GPUs in an order whose neighbours sit in different nodes (node 0's first
    GPU, node 1's first, ..., node 0's second, ...)."""
    return np.arange(layout.num_gpus).reshape(layout.num_nodes, -1).T.reshape(-1)


def packed_placement(load: np.ndarray, counts: np.ndarray, layout: Layout) -> np.ndarray:
    """A first placement by DeepSeek's packing greedy (module doc, `packing.balanced_packing`).

    Args:
        load: [L, E] float64 forecast tokens per expert.
        counts: [L, E] int64 replicas per expert, in [1, G], each layer summing to S.
        layout: the cluster.

    Returns:
        experts: [L, G, k] int64; GPU g is the g-th of the node-interleaved order (consecutive
        packs, which the greedy fills with an expert's consecutive replicas, sit in different
        nodes). A GPU may hold two replicas of an expert only where packing left no choice
        (`repair_duplicates` fixes it).
    """
    num_layers = load.shape[0]
    replica_load, replica_expert, _ = expert_major_replicas(load, counts)
    item_at = balanced_packing(replica_load, layout.num_gpus, replica_expert)
    packed = take_rows(replica_expert, item_at).reshape(num_layers, layout.num_gpus, -1)
    experts = np.empty_like(packed)
    experts[:, node_interleaved(layout)] = packed
    return experts


def repair_duplicates(
    state: SlotState, layers: np.ndarray, preferred: np.ndarray | None = None
) -> None:
    """Move the second replica of an expert off every GPU of `layers` that holds it twice.

    `tape.policies.packing.spread_replicas` does the work (the deepseek and bldm policies'
    repair): each surplus replica trades places with the slot, on a GPU without its expert,
    that leaves the larger of the two GPUs' loads smallest; among the `preferred` slots
    ([L * S] bool, flat) first, if given. Such a slot exists whenever k <= E.

    Args:
        state: the placement; updated in place (its bookkeeping too).
        layers: [n] int, the layers to repair.
        preferred: [L * S] bool, or None.
    """
    layers = np.unique(np.asarray(layers, dtype=np.int64))
    if not len(layers):
        return
    layout = state.layout
    num_slots = layout.num_replicas
    experts = state.experts.reshape(-1, num_slots)[layers]  # [n, S]
    slot_load = state.slot_load.reshape(-1, num_slots)[layers]
    item_at = np.tile(np.arange(num_slots), (len(layers), 1))
    spread_replicas(item_at, experts, slot_load, layout.num_gpus,
                    None if preferred is None else preferred.reshape(-1, num_slots)[layers])
    state.experts[layers] = take_rows(experts, item_at).reshape(len(layers), layout.num_gpus, -1)
    state.reload(layers)


def second_replicas(experts: np.ndarray) -> np.ndarray:
    """[L, G, k] bool: slots whose expert sits in an earlier slot of the same GPU."""
    same = experts[..., :, None] == experts[..., None, :]  # [L, G, k, k]
    return np.tril(same, k=-1).any(axis=3)


def _group_ranks(keys: np.ndarray) -> np.ndarray:
    """Rank of each entry among those with its key, for `keys` sorted (equal keys adjacent)."""
    index = np.arange(len(keys))
    starts = np.ones(len(keys), dtype=bool)
    np.not_equal(keys[1:], keys[:-1], out=starts[1:])
    return index - np.maximum.accumulate(np.where(starts, index, 0))


def _slots_to_free(state: SlotState, counts: np.ndarray) -> np.ndarray:
    """Flat indices (sorted) of the slots whose replica goes, for new replica counts `counts`.

    An expert loses `old - new` replicas, and every second replica on one GPU. Among an
    expert's slots, those go first that are second replicas, then those whose node keeps
    another replica (no locality lost), then those on heavier GPUs.
    """
    layout = state.layout
    experts = state.experts.reshape(-1)
    key = state.slot_layer + experts  # [L * S] layer * E + expert
    to_free = (state.counts - counts).reshape(-1)
    second = None
    if state.duplicates:
        second = second_replicas(state.experts).reshape(-1)
        to_free = np.maximum(to_free, np.bincount(key[second], minlength=to_free.size))
    candidate = np.flatnonzero(to_free[key] > 0)
    if not len(candidate):
        return candidate
    gpu = state.slot_gpu[candidate]
    layer = gpu // layout.num_gpus
    heaviest = state.gpu_load.max(axis=1).clip(1e-300)
    # Preference in [0, 4): 2 for a second replica, 1 if its node keeps another, < 1 heavier.
    preference = state.gpu_load.reshape(-1)[gpu] / heaviest[layer] * 0.999
    preference += state.node_replicas.reshape(-1)[state.slot_node[candidate]
                                                  + experts[candidate]] > 1
    if second is not None:
        preference += 2.0 * second[candidate]
    # Candidates grouped by layer and expert, the preferred first; the first `to_free` go.
    candidate_key = key[candidate]
    order = np.argsort(candidate_key * 4.0 - preference, kind="stable")
    ordered_key = candidate_key[order]
    chosen = candidate[order[_group_ranks(ordered_key) < to_free[ordered_key]]]
    chosen.sort()
    return chosen


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
    freed = _slots_to_free(state, counts)
    if not len(freed):
        return  # every count stays (none falls, and they add up to S)
    old_counts = state.counts
    state.counts = counts
    layout = state.layout
    num_layers, num_experts = counts.shape
    gpus_per_node = layout.gpus_per_node
    experts = state.experts.reshape(-1)
    held = state.held.reshape(-1)
    node_replicas = state.node_replicas.reshape(-1)

    # Empty the freed slots; the kept ones take their loads under the new counts.
    gone = experts[freed]
    added = (counts - old_counts).reshape(-1) + np.bincount(state.slot_layer[freed] + gone,
                                                            minlength=counts.size)
    np.subtract.at(node_replicas, state.slot_node[freed] + gone, 1)
    experts[freed] = -1
    if state.duplicates:
        occupied = np.flatnonzero(experts >= 0)
        held[:] = False
        held[state.slot_held[occupied] + experts[occupied]] = True
    else:
        held[state.slot_held[freed] + gone] = False
    per_replica = (state.load / counts).reshape(-1)
    slot_load = per_replica[state.slot_layer + experts]
    slot_load[freed] = 0.0
    state.slot_load = slot_load.reshape(state.experts.shape)
    gpu_load = slot_load.reshape(-1, layout.slots_per_gpu) @ np.ones(layout.slots_per_gpu)
    state.gpu_load = gpu_load.reshape(num_layers, layout.num_gpus)

    # Freed slots and new replicas (heaviest first) per layer, padded to the widest layer:
    # [L, W]. Every layer has as many new replicas as freed slots.
    freed_layer = freed // layout.num_replicas
    width = int(np.bincount(freed_layer).max())
    position = freed_layer * width + _group_ranks(freed_layer)  # flat [L, W] index
    gaining = np.flatnonzero(added)
    new_key = np.repeat(gaining, added[gaining])  # layer * E + expert, by layer
    assert len(new_key) == len(freed), "new replicas fill the freed slots"
    new_key = new_key[np.lexsort((-per_replica[new_key], new_key // num_experts))]
    padding = np.ones(num_layers * width, dtype=bool)
    padding[position] = False
    free_slots = np.zeros(num_layers * width, dtype=np.int64)
    free_slots[position] = freed
    new_expert = np.zeros(num_layers * width, dtype=np.int64)
    new_expert[position] = new_key % num_experts
    new_load = np.zeros(num_layers * width)
    new_load[position] = per_replica[new_key]
    padding, new_expert = padding.reshape(num_layers, width), new_expert.reshape(num_layers, width)
    new_load = new_load.reshape(num_layers, width)
    free_gpu = state.slot_gpu[free_slots].reshape(num_layers, width)  # flat GPUs
    free_node = free_gpu // gpus_per_node

    # cost[l, t, j]: what new replica t adds to the objective in freed slot j, in tokens,
    # beside the GPU's load: a weight copy unless the GPU held the expert before, and the
    # tokens of a node that already holds the expert. A GPU that holds the expert adds
    # `penalty`, more than any other choice costs.
    replica = new_expert[:, :, None]  # [L, W, 1]
    gpu_index = free_gpu[:, None, :] * num_experts + replica  # [L, W, W]
    # Per layer, so that a layer's plan does not depend on how heavy the other layers are.
    penalty = (1e6 * (1.0 + migration_weight + locality_weight)
               * state.total_load.reshape(-1, 1, 1))  # [L, 1, 1]
    cost = penalty * held[gpu_index]
    if state.held_before is not None and migration_weight:
        mean = state.mean_gpu_load[:, None, None]
        cost += migration_weight * mean * ~state.held_before.reshape(-1)[gpu_index]
    use_locality = locality_weight > 0 and layout.num_nodes > 1
    if use_locality:
        per_token = locality_weight / layout.num_nodes * state.mean_gpu_load / state.total_load
        node_charge = per_token[:, None] * state.load.reshape(-1)[
            (np.arange(num_layers) * num_experts)[:, None] + new_expert]  # [L, W]
        in_node = node_replicas[free_node[:, None, :] * num_experts + replica] > 0  # [L, W, W]
        cost += node_charge[:, :, None] * in_node

    # Later replicas of an expert that gets several: not on the GPU an earlier one took (the
    # penalty), and charged for its node if the node gained the expert. One entry per pair
    # (step t, layer, later step t'), by step; `twin_update[i, j]`: what the pair adds to
    # row t' of `cost` when replica t takes slot j.
    later_twin = np.triu((replica == new_expert[:, None, :]) & ~padding[:, None, :], k=1)
    twins = np.flatnonzero(later_twin.transpose(1, 0, 2))  # [t, L, t'] order: by step
    twin_step, twin_layer, twin_later = np.unravel_index(twins, (width, num_layers, width))
    bounds = np.searchsorted(twin_step, np.arange(width + 1)).tolist()
    same_gpu = (free_gpu[:, :, None] == free_gpu[:, None, :]) & ~padding[:, None, :]
    twin_update = penalty[twin_layer] * same_gpu[twin_layer]  # [m, W, W]
    if use_locality:
        same_node = free_node[twin_layer][:, :, None] == free_node[twin_layer][:, None, :]
        gained = same_node & ~in_node[twin_layer, twin_later][:, :, None]
        twin_update += node_charge[twin_layer, twin_later, None, None] * gained

    # The greedy, all layers at once: `base` is each freed slot's GPU load, inf once taken
    # (and for padding). With two freed slots on one GPU, taking one loads the other:
    # `sharing[l, j, j']` is 1 for another freed slot on j's GPU, inf for j itself.
    base = np.where(padding, np.inf, gpu_load.reshape(-1)[free_gpu])  # [L, W]
    rows = np.arange(num_layers)
    sharing = None
    if np.count_nonzero(same_gpu) > np.count_nonzero(~padding):
        sharing = same_gpu.astype(np.float64)
        sharing[:, np.arange(width), np.arange(width)] = np.inf
        weight = new_load + 1e-300  # positive, so that inf * weight stays inf
    picks = []
    for step in range(width):
        pick = (cost[:, step] + base).argmin(axis=1)
        picks.append(pick)
        if sharing is None:
            base[rows, pick] = np.inf
        else:
            base += sharing[rows, pick] * weight[:, step, None]
        first, last = bounds[step], bounds[step + 1]
        if last > first:
            layer = twin_layer[first:last]
            cost[layer, twin_later[first:last]] += twin_update[np.arange(first, last), pick[layer]]

    # Write the new replicas into their slots; move off any that doubled up on a GPU.
    real = ~padding.reshape(-1)
    choice = np.stack(picks, axis=1)  # [L, W]
    slot = free_slots[(rows[:, None] * width + choice).reshape(-1)][real]
    expert = new_expert.reshape(-1)[real]
    index = state.slot_held[slot] + expert
    doubled = held[index]
    experts[slot] = expert
    held[index] = True
    np.add.at(node_replicas, state.slot_node[slot] + expert, 1)
    slot_load[slot] = new_load.reshape(-1)[real]
    np.add.at(state.gpu_load.reshape(-1), state.slot_gpu[slot], slot_load[slot])
    ordered = np.sort(index)
    if doubled.any() or (ordered[1:] == ordered[:-1]).any():
        again = np.ones(len(index), dtype=bool)
        again[np.unique(index, return_index=True)[1]] = False  # a second new replica
        # A swap with another new replica moves no kept expert (no extra weight copy).
        refilled = np.zeros(experts.size, dtype=bool)
        refilled[slot] = True
        repair_duplicates(state, slot[doubled | again] // layout.num_replicas,
                          preferred=refilled)


def keep_previous_slots(
    experts: np.ndarray, previous: np.ndarray, held_before: np.ndarray
) -> np.ndarray:
    """`experts` with each GPU's slots reordered to keep experts in their previous slots.

    Args:
        experts: [L, G, k] int64, the new placement (no expert twice on a GPU).
        previous: [L, G, k] int64, the placement in force (may hold an expert twice on a GPU).
        held_before: [L, G, E] bool, whether each GPU holds each expert in `previous`.

    Returns:
        [L, G, k] int64 with the same experts on every GPU (`experts` itself when nothing
        moves): an expert the GPU held before sits in the first slot where it sat; the GPU's
        new experts fill its other slots in order.
    """
    per_gpu = experts.shape[2]
    num_experts = held_before.shape[2]
    flat = experts.reshape(-1)
    # Only a GPU with an expert in a slot other than its old one needs reordering.
    differ = np.flatnonzero(flat != previous.reshape(-1))
    gpu = differ // per_gpu
    misplaced = held_before.reshape(-1)[gpu * num_experts + flat[differ]]
    if not misplaced.any():
        return experts
    changed = np.unique(gpu[misplaced])  # flat GPUs
    new = experts.reshape(-1, per_gpu)[changed]  # [n, k]
    old = previous.reshape(-1, per_gpu)[changed]
    first_of_its_expert = ~np.tril(old[:, :, None] == old[:, None, :], k=-1).any(axis=2)
    same = old[:, :, None] == new[:, None, :]  # [n, old slot, new slot]
    kept_slot = first_of_its_expert & same.any(axis=2)
    arrives = ~same.any(axis=1)  # [n, new slot]: the expert was not on the GPU
    # As many arriving experts as free slots on every GPU: they fill them in slot order.
    reordered = np.where(kept_slot, old, 0)
    reordered.reshape(-1)[np.flatnonzero(~kept_slot)] = new.reshape(-1)[np.flatnonzero(arrives)]
    result = experts.copy()
    result.reshape(-1, per_gpu)[changed] = reordered
    return result
