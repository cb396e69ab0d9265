"""Local search for the `tape` policy: swaps between heavy and light GPUs, all layers at once.

Each round sorts every layer's GPUs by forecast load and pairs the heaviest with the lightest,
the second heaviest with the second lightest, and so on for `pairs` pairs. For each pair it
tries every swap of one slot of the heavy GPU with one slot of the light GPU and keeps the swap
that lowers the objective most (`state` module doc), counting for that swap:

- balance: the change of the pair's larger load (it must fall below the heavy GPU's load);
- migration: the change in weight copies (a slot whose GPU did not hold its expert before);
- locality: the change in inter-node tokens when the swap moves experts between nodes.

A swap that would put two replicas of an expert on one GPU is never made. The pairs of a round
share no GPU, so their swaps are independent and are all applied. A layer stops when no pair
finds a swap that lowers the objective, or when its heaviest GPU is within `tolerance` of the
mean; the search stops after `rounds` rounds.

How a round is computed: a pair's 2k slots (the heavy GPU's k, then the light GPU's k) are
gathered by flat index. Moving a load s from the heavy GPU (load h) to the light one (load l,
gap d = h - l) turns the pair's larger load into `(h + l) / 2 + |s - d / 2|`, so the balance
gain is `d / 2 - |s - d / 2|`, positive only for 0 < s < d. The k * k swaps' load shifts and
their charges are differences and sums of the 2k slot values, broadcast over [pairs, k, k].
"""

from __future__ import annotations

import numpy as np

from tape.policies.tape.state import SlotState

__all__ = ["balance_by_swaps", "relieve_peaks"]

_NO_GAIN = 1e300
"""The score of a swap that does not lower the pair's larger load (charges added to it do not
change it): never chosen."""


def balance_by_swaps(
    state: SlotState,
    *,
    rounds: int,
    pairs: int,
    migration_weight: float,
    locality_weight: float,
    tolerance: float,
    copy_budget: float | None = None,
) -> None:
    """Improve `state` in place by rounds of swaps (module doc).

    Args:
        state: the placement to improve; every GPU holds at most one replica of an expert.
        rounds: the most rounds.
        pairs: heavy/light GPU pairs per round, 1 to G / 2.
        migration_weight: charge per weight copy, in units of the layer's mean GPU load.
        locality_weight: charge per inter-node token, relative to the layer's total load.
        tolerance: a layer whose heaviest GPU is at most (1 + tolerance) * mean is left alone.
        copy_budget: with a previous placement, the most weight copies a layer may have (slots
            whose GPU did not hold their expert before), as a fraction of its slots: a layer at
            the budget makes no swap that adds a copy. None: no budget.
    """
    layout = state.layout
    num_gpus, per_gpu = layout.num_gpus, layout.slots_per_gpu
    num_experts = state.load.shape[1]
    mean = state.mean_gpu_load
    limit = (1.0 + tolerance) * mean  # [L] tokens
    migration_charge = migration_weight * mean  # [L] tokens per weight copy
    node_charge = locality_weight * mean / state.total_load / layout.num_nodes  # per token
    use_migration = state.held_before is not None and migration_weight > 0
    use_locality = locality_weight > 0 and layout.num_nodes > 1
    # A blocked swap (an expert onto a GPU that holds it) costs more than any swap can gain.
    penalty = 1e6 * state.total_load.max() * (1.0 + migration_weight + locality_weight)
    # Columns of a layer's GPUs sorted by load: the heaviest `pairs`, then the lightest.
    ends = np.concatenate([np.arange(num_gpus - 1, num_gpus - 1 - pairs, -1), np.arange(pairs)])
    slot_offset = np.arange(per_gpu)[None, None, :]
    experts_flat = state.experts.reshape(-1)
    slot_load_flat = state.slot_load.reshape(-1)
    load_flat = state.load.reshape(-1)
    held = state.held.reshape(-1)
    active = state.gpu_load.max(axis=1) > limit
    budgeted = copy_budget is not None and state.held_before is not None
    if budgeted:
        held_before = state.held_before.reshape(-1)
        room = (copy_budget * layout.num_replicas
                - (~held_before[state.slot_held + experts_flat]).reshape(
                    -1, layout.num_replicas).sum(axis=1))  # [L] copies a layer may still add

        def copies_of(first: np.ndarray, second: np.ndarray) -> np.ndarray:
            """Copies the swaps of flat slots `first` and `second` add (negative: remove)."""
            one, two = experts_flat[first], experts_flat[second]
            at_one, at_two = state.slot_held[first], state.slot_held[second]
            before = (~held_before[at_one + one]).astype(np.int64) + ~held_before[at_two + two]
            after = (~held_before[at_two + one]).astype(np.int64) + ~held_before[at_one + two]
            return after - before
    for _ in range(rounds):
        layers = np.flatnonzero(active)
        if not len(layers):
            break
        count = len(layers)
        by_load = np.argsort(state.gpu_load[layers], axis=1)
        by_load += (layers * num_gpus)[:, None]  # flat GPUs
        pair_gpu = by_load[:, ends].reshape(count, 2, pairs).transpose(1, 0, 2).reshape(2, -1)
        pair_layer = np.repeat(layers, pairs)  # [P]
        pair_load = state.gpu_load.reshape(-1)[pair_gpu]  # [2, P]: heavy, light
        half_gap = (pair_load[0] - pair_load[1]) * 0.5  # [P]

        # The pairs' slots, [2, P, k]: the heavy GPUs' k slots, then the light GPUs'.
        slots = pair_gpu[:, :, None] * per_gpu + slot_offset
        experts = experts_flat[slots]
        slot_load = slot_load_flat[slots]
        gpu_key = pair_gpu * num_experts
        own = experts + gpu_key[:, :, None]  # flat indices into `held`
        other = experts + gpu_key[::-1, :, None]
        charge = penalty * held[other]  # [2, P, k] tokens
        if use_migration:
            held_before = state.held_before.reshape(-1)
            # +1 when the expert leaves a GPU that held it before, -1 when it returns to one.
            copies = held_before[own].view(np.int8) - held_before[other].view(np.int8)
            charge += migration_charge[pair_layer, None] * copies
        if use_locality:
            node_replicas = state.node_replicas.reshape(-1)
            node_key = pair_gpu // layout.gpus_per_node * num_experts  # [2, P]
            # Nodes the swap adds (+1) or removes (-1) for the expert; none within a node.
            nodes = ((node_replicas[experts + node_key[::-1, :, None]] == 0).view(np.int8)
                     - (node_replicas[experts + node_key[:, :, None]] == 1).view(np.int8))
            per_token = node_charge[pair_layer] * (node_key[0] != node_key[1])  # [P]
            charge -= load_flat[experts + (pair_layer * num_experts)[:, None]] * nodes * per_token[
                :, None]

        # score[P, i, j]: heavy slot i with light slot j; |shift - gap / 2| (the pair's larger
        # load after the swap, less the mean of the two), then the charges; one buffer, with
        # the pairs first so that every operation runs over contiguous memory.
        gap = half_gap[:, None, None]
        score = slot_load[0, :, :, None] - slot_load[1, :, None, :]  # load moved
        score -= gap
        np.abs(score, out=score)
        score[score >= gap] = _NO_GAIN
        score += charge[0, :, :, None]
        score += charge[1, :, None, :]
        score = score.reshape(len(half_gap), per_gpu * per_gpu)
        best = score.argmin(axis=1)  # [P]
        pick = np.arange(len(best))
        gain = half_gap - score[pick, best]
        useful = (gain > 1e-12 * mean[pair_layer]) & (pair_load[0] > limit[pair_layer])
        if budgeted:
            # The copies the best swap adds: each expert that moves onto a GPU that did not
            # hold it before, less each that returns to one.
            heavy_slot, light_slot = np.divmod(best, per_gpu)
            moved = copies_of(slots[0, pick, heavy_slot], slots[1, pick, light_slot])
            # the pairs of one layer (adjacent, heaviest first) spend its room in turn
            spend = moved.reshape(count, pairs).cumsum(axis=1).reshape(-1)
            useful &= (moved <= 0) | (spend <= room[pair_layer])
        active[layers[~useful.reshape(count, pairs).any(axis=1)]] = False
        chosen = np.flatnonzero(useful)
        if not len(chosen):
            break
        heavy_slot, light_slot = np.divmod(best[chosen], per_gpu)
        if budgeted:
            np.add.at(room, pair_layer[chosen], -moved[chosen])
        state.swap(pair_gpu[0, chosen] * per_gpu + heavy_slot,
                   pair_gpu[1, chosen] * per_gpu + light_slot)


def relieve_peaks(
    state: SlotState,
    *,
    rounds: int,
    partners: int,
    migration_weight: float,
    locality_weight: float,
    copy_budget: float | None = None,
) -> None:
    """Lower each layer's heaviest GPU by swaps with its best partner among the lightest GPUs.

    The pairs of `balance_by_swaps` match the i-th heaviest GPU with the i-th lightest; with few
    slots a GPU that partner often holds no slot whose swap lowers the pair's larger load (its
    slots are as heavy as the heavy GPU's), while a GPU a little heavier does. Here each round
    takes every layer's heaviest GPU h and tries every swap of one of its k slots with one slot
    of the layer's `partners` lightest GPUs (k * partners * k swaps), scored as in
    `balance_by_swaps` (the pair's larger load after the swap, plus the charges), and makes
    the best if that lowers the objective. One swap a layer a round, so the swaps of a round
    share no GPU. A layer stops when no swap helps.

    The copy budget is pooled over the layers: the copies the budget still allows all layers
    together (after the refill and the pair swaps) go, round by round, to the layers' best swaps
    in decreasing order of peak lowered per copy, so a layer whose peak falls most per copy may
    use another layer's unused copies. The total stays within `copy_budget` of all slots.

    Args:
        state: the placement to improve.
        rounds: the most rounds.
        partners: how many of a layer's lightest GPUs its heaviest may swap with, 1 to G - 1.
        migration_weight, locality_weight: as `balance_by_swaps`.
        copy_budget: with a previous placement, the most weight copies of all layers together
            as a fraction of all slots; None: no budget.
    """
    layout = state.layout
    num_gpus, per_gpu = layout.num_gpus, layout.slots_per_gpu
    num_experts = state.load.shape[1]
    mean = state.mean_gpu_load
    migration_charge = migration_weight * mean  # [L] tokens per weight copy
    node_charge = locality_weight * mean / state.total_load / layout.num_nodes  # per token
    use_migration = state.held_before is not None and migration_weight > 0
    use_locality = locality_weight > 0 and layout.num_nodes > 1
    penalty = 1e6 * state.total_load.max() * (1.0 + migration_weight + locality_weight)
    experts_flat = state.experts.reshape(-1)
    slot_load_flat = state.slot_load.reshape(-1)
    gpu_load_flat = state.gpu_load.reshape(-1)
    load_flat = state.load.reshape(-1)
    held = state.held.reshape(-1)
    offsets = np.arange(per_gpu)
    budgeted = copy_budget is not None and state.held_before is not None
    counting = budgeted or use_migration
    if counting:
        held_before = state.held_before.reshape(-1)
    if budgeted:
        pool = copy_budget * experts_flat.size - np.count_nonzero(
            ~held_before[state.slot_held + experts_flat])  # copies all layers may still add
    active = np.ones(len(mean), dtype=bool)
    for _ in range(rounds):
        layers = np.flatnonzero(active)
        if not len(layers) or (budgeted and pool < 1):
            break
        count = len(layers)
        loads = state.gpu_load[layers]
        heavy = loads.argmax(axis=1) + layers * num_gpus  # [n] flat GPUs
        light = np.argpartition(loads, partners - 1, axis=1)[:, :partners]
        light += (layers * num_gpus)[:, None]  # [n, m] flat GPUs
        heavy_slots = heavy[:, None] * per_gpu + offsets  # [n, k]
        light_slots = (light[:, :, None] * per_gpu + offsets).reshape(count, -1)  # [n, m k]
        light_gpu = np.repeat(light, per_gpu, axis=1)  # [n, m k]
        heavy_load = gpu_load_flat[heavy]  # [n]
        heavy_expert, light_expert = experts_flat[heavy_slots], experts_flat[light_slots]
        # score[n, i, j]: heavy slot i with light slot j; the pair's larger load after the
        # swap (a swap that does not lower the heavy GPU's load is never chosen; a slot of the
        # heavy GPU among the partners' cannot lower it), then the charges.
        shift = slot_load_flat[heavy_slots][:, :, None] - slot_load_flat[light_slots][:, None, :]
        score = np.maximum(heavy_load[:, None, None] - shift,
                           gpu_load_flat[light_gpu][:, None, :] + shift)
        np.putmask(score, score >= heavy_load[:, None, None], _NO_GAIN)
        heavy_key = (heavy * num_experts)[:, None]  # [n, 1] flat index in `held`
        light_key = light_gpu * num_experts  # [n, m k]
        heavy_there = light_key[:, None, :] + heavy_expert[:, :, None]  # [n, k, m k]
        light_here = heavy_key + light_expert  # [n, m k]
        score += penalty * held[heavy_there]
        score += (penalty * held[light_here])[:, None, :]
        if counting:
            # Copies the swap adds: an expert onto a GPU that did not hold it before, less
            # each that leaves such a GPU.
            copies = (~held_before[heavy_there]).astype(np.int64)
            copies += (~held_before[light_here]).astype(np.int64)[:, None, :]
            copies -= (~held_before[heavy_key + heavy_expert])[:, :, None]
            copies -= (~held_before[light_key + light_expert])[:, None, :]
            if use_migration:
                score += migration_charge[layers][:, None, None] * copies
        if use_locality:
            node_replicas = state.node_replicas.reshape(-1)
            heavy_node = (heavy // layout.gpus_per_node * num_experts)[:, None]  # [n, 1]
            light_node = light_gpu // layout.gpus_per_node * num_experts  # [n, m k]
            per_token = node_charge[layers][:, None] * (light_node != heavy_node)  # [n, m k]
            # Nodes each expert gains (+1) or loses (-1); none within a node.
            heavy_nodes = ((node_replicas[light_node[:, None, :] + heavy_expert[:, :, None]]
                            == 0).view(np.int8)
                           - (node_replicas[heavy_node + heavy_expert] == 1).view(np.int8)[
                               :, :, None])
            light_nodes = ((node_replicas[heavy_node + light_expert] == 0).view(np.int8)
                           - (node_replicas[light_node + light_expert] == 1).view(np.int8))
            layer_key = (layers * num_experts)[:, None]
            score -= (load_flat[layer_key + heavy_expert][:, :, None] * heavy_nodes
                      * per_token[:, None, :])
            score -= (load_flat[layer_key + light_expert] * light_nodes * per_token)[:, None, :]
        score = score.reshape(count, -1)
        best = score.argmin(axis=1)
        pick = np.arange(count)
        lowered = heavy_load - score[pick, best]
        useful = lowered > 1e-12 * mean[layers]
        if budgeted:
            spent = copies.reshape(count, -1)[pick, best]
            # the best swaps per copy first, until the pool is spent
            order = np.argsort(-lowered / np.maximum(spent, 1), kind="stable")
            total = np.cumsum(np.where(useful[order], np.maximum(spent[order], 0), 0))
            within = np.empty(count, dtype=bool)
            within[order] = total <= pool
            useful &= within
        active[layers[~useful]] = False
        chosen = np.flatnonzero(useful)
        if not len(chosen):
            break
        if budgeted:
            pool -= spent[chosen].sum()
        heavy_index, light_index = np.divmod(best[chosen], per_gpu * partners)
        state.swap(heavy_slots[chosen, heavy_index], light_slots[chosen, light_index])
