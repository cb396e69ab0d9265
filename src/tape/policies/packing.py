"""Batched building blocks shared by the baseline policies.

Every function works on many independent rows at once (a row is a layer, or a layer's node):
Python loops run over items or added replicas, never over rows.

Vocabulary: an *item* is a thing to place (an expert group, an expert, or one replica of an
expert) with a load; a *pack* is a bin of fixed capacity (a node or a GPU). Replica lists are
*expert-major*: an expert's replicas have consecutive indices, ranks 0, 1, ... in that order.
"""

from __future__ import annotations

import numpy as np

from tape.placement import Placement

__all__ = [
    "balanced_packing",
    "descending_order",
    "expert_major_replicas",
    "placement_from_ranks",
    "replica_counts",
    "replica_ranks",
    "spread_replicas",
    "take_rows",
]


def take_rows(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """[X, m]: `array[x, index[x, j]]` (`np.take_along_axis` on axis 1, faster).

    Args:
        array: [X, n].
        index: [X, m] int, in 0..n-1.
    """
    rows, width = array.shape
    return array.take(index + np.arange(0, rows * width, width)[:, None])


def _largest(values: np.ndarray, count: int) -> np.ndarray:
    """[X, M] bool: the `count` largest values of each row, ties to the lowest index (EPLB's
    greedy takes the lowest expert among equally loaded ones)."""
    width = values.shape[1]
    if count >= width:  # every value (S - E >= E spare slots: every expert is a candidate)
        return np.ones(values.shape, dtype=bool)
    cut = np.partition(values, width - count, axis=1)[:, width - count, None]  # [X, 1]
    chosen = values >= cut
    if np.count_nonzero(chosen) == chosen.shape[0] * count:  # no ties at the cut
        return chosen
    tied = values == cut
    wanted = count - np.count_nonzero(values > cut, axis=1)[:, None]  # ties to take, >= 1
    return (values > cut) | (tied & (np.cumsum(tied, axis=1) <= wanted))


def _eplb_steps(weight: np.ndarray, counts: np.ndarray, spare: int) -> np.ndarray:
    """`counts` ([X * n] ones) after `spare` steps of EPLB's greedy: each step gives every row's
    expert of largest `weight / count` (the first on ties) one more replica."""
    rows, num_experts = weight.shape
    weight_flat = weight.reshape(-1)
    per_replica = weight.copy()
    per_replica_flat = per_replica.reshape(-1)
    row_base = np.arange(0, rows * num_experts, num_experts)
    for _ in range(spare):
        flat = per_replica.argmax(axis=1) + row_base
        replicas = counts[flat] + 1
        counts[flat] = replicas
        per_replica_flat[flat] = weight_flat[flat] / replicas.astype(weight.dtype)
    return counts


def replica_counts(
    weight: np.ndarray,
    num_slots: int,
    *,
    max_replicas: int | None = None,
    node_bonus: float = 0.0,
    num_nodes: int = 1,
    keep_bonus: np.ndarray | None = None,
    previous_counts: np.ndarray | None = None,
) -> np.ndarray:
    """[X, n] int64: replicas per expert, each spare slot to the most valuable replica.

    Every expert gets one slot. Each of the `num_slots - n` spare slots then goes, one at a
    time, to the replica of highest value, the j-th replica (j >= 2) of expert e being worth

        weight[e] / (j - 1)                     the per-replica load it splits
      + node_bonus * weight[e] * [j <= num_nodes]   it can sit in one more node
      + keep_bonus[row] * [j <= previous_counts[e]]  it already exists

    ties to the lowest expert. With no bonus (the defaults) this is DeepSeek EPLB's
    `replicate_experts` (each slot to the largest `weight / count`), which is optimal for the
    largest per-replica load; the deepseek and bldm policies use it so. The `tape` policy
    adds the bonuses (`tape.policies.tape.counts`) and caps replicas at G.

    The value falls as j grows, so the greedy takes the spare-many most valuable replicas of
    all: one selection per row among the j-th replicas of the experts with the most valuable
    second replicas (an expert outside those gets no spare slot), j bounded by what can still
    beat the worst of those. Without bonuses or cap (EPLB's mode) the greedy runs instead as
    EPLB writes it, one spare slot a step for all rows at once: the same counts (tests check
    both against a plain loop), and faster when the spare slots are few (0.3 ms against 1-2.5
    ms for 64 spare slots over 256 experts and 58 layers; 0.07 against 0.15 ms for
    deepseek's per-node counts), where the selection's columns (up to the hottest expert's
    load over the worst chosen second replica's) are many.

    Args:
        weight: [X, n] float, each expert's load. Values are computed and compared in
            `weight`'s dtype when it is float32 (as the reference does) and in float64
            otherwise.
        num_slots: slots per row, at least n.
        max_replicas: the most replicas of one expert (None: no limit).
        node_bonus: per token of load, for the replicas j <= `num_nodes` (0 when
            `num_nodes` < 2).
        num_nodes: the nodes a replica can add.
        keep_bonus: [X] tokens per existing replica (None: none); needs `previous_counts`.
        previous_counts: [X, n] int, the counts in force.
    """
    rows, num_experts = weight.shape
    assert num_slots >= num_experts, "every expert needs a slot"
    if weight.dtype != np.float32:
        weight = np.asarray(weight, dtype=np.float64)
    spare = num_slots - num_experts
    counts = np.ones(rows * num_experts, dtype=np.int64)
    if spare == 0:
        return counts.reshape(rows, num_experts)
    limit = spare + 1 if max_replicas is None else min(max_replicas, spare + 1)
    spread = node_bonus if num_nodes >= 2 else 0.0
    keep = keep_bonus is not None and previous_counts is not None and np.any(keep_bonus > 0)
    if not spread and not keep and limit == spare + 1:
        return _eplb_steps(weight, counts, spare).reshape(rows, num_experts)
    second = weight * (1.0 + spread) if spread else weight
    if keep:
        second = second + np.where(previous_counts >= 2, keep_bonus[:, None], 0.0)
    candidates = min(spare, num_experts)
    chosen = np.flatnonzero(_largest(second, candidates))  # [X * C] flat, by row
    chosen_load = weight.reshape(-1)[chosen].reshape(rows, candidates)
    # Beyond max(N, previous count) the j-th replica is worth load / (j - 1): one worth less
    # than the value of the last spare slot taken is never taken. That value is at least
    # the worst chosen second replica's (when the candidates are the spare slots), and at
    # least total / S: the replicas worth that much or more without bonuses number
    # sum over e of floor(load[e] S / total) >= S - E, the spare slots, already.
    floor_value = weight.sum(axis=1) / num_slots  # [X]
    if candidates == spare:
        chosen_second = second.reshape(-1)[chosen].reshape(rows, candidates)
        floor_value = np.maximum(floor_value, chosen_second.min(axis=1))
    widest = limit
    if floor_value.min() > 0:  # (an idle row has no value to bound the columns by)
        by_load = int((chosen_load.max(axis=1) / floor_value).max()) + 2  # + 1 for rounding
        by_count = int(previous_counts.max()) if keep else 1
        widest = min(limit, max(num_nodes if spread else 1, by_count, by_load))
    replica = np.arange(2, widest + 1)  # [J]: the j of each column
    # Rows: the C chosen experts of every row; columns: replicas 2..J + 1.
    value = chosen_load.reshape(-1, 1) / (replica - 1).astype(weight.dtype)  # [X * C, J]
    if spread:
        value += chosen_load.reshape(-1, 1) * (spread * (replica <= num_nodes))
    if keep:
        existing = replica <= previous_counts.reshape(-1)[chosen][:, None]  # [X * C, J]
        value += np.where(existing, np.repeat(keep_bonus, candidates)[:, None], 0.0)
    taken = np.flatnonzero(_largest(value.reshape(rows, -1), spare)) // len(replica)
    counts[chosen] += np.bincount(taken, minlength=len(chosen))
    return counts.reshape(rows, num_experts)


def expert_major_replicas(
    weight: np.ndarray, count: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's replicas in expert-major order, with their loads.

    Args:
        weight: [X, n] float, each expert's load.
        count: [X, n] int, replicas of each expert; every row sums to the same m.

    Returns:
        replica_load: [X, m] float64, `weight / count` of the replica's expert.
        replica_expert: [X, m] int64, the replica's expert.
        replica_rank: [X, m] int64, the replica's rank among its expert's (0 first).
    """
    rows, num_experts = weight.shape
    flat_count = count.reshape(-1)
    width = int(flat_count.sum()) // rows
    source = np.repeat(np.arange(rows * num_experts), flat_count)  # flat (row, expert) index
    per_replica = (np.asarray(weight, dtype=np.float64) / count).reshape(-1)
    first = np.cumsum(flat_count)
    first -= flat_count  # flat index of each expert's first replica
    replica_rank = np.arange(rows * width) - first.take(source)
    replica_expert = (
        source.reshape(rows, width) - np.arange(0, rows * num_experts, num_experts)[:, None]
    )
    return (
        per_replica.take(source).reshape(rows, width),
        replica_expert,
        replica_rank.reshape(rows, width),
    )


def descending_order(weight: np.ndarray) -> np.ndarray:
    """[X, n] int64: each row's items by decreasing load, tied items by index.

    Loads are compared as float32, as DeepSeek EPLB sorts them (`weight.float().sort()`).
    Sorting packed 64-bit keys (load bits, index) is several times faster than an argsort.

    Args:
        weight: [X, n] float, non-negative loads.
    """
    num_items = weight.shape[1]
    index_bits = max((num_items - 1).bit_length(), 1)
    # Non-negative float32 values sort like their bits; abs turns -0.0 into +0.0.
    bits = np.abs(np.asarray(weight, dtype=np.float32)).view(np.int32)
    if 31 + index_bits > 63:
        return np.argsort(-bits, axis=1, kind="stable")
    key = (np.int64(2**31 - 1) - bits) << index_bits
    key |= np.arange(num_items)
    key.sort(axis=1)
    key &= (1 << index_bits) - 1
    return key


_CHUNK_STEPS = 8


def balanced_packing(
    weight: np.ndarray, num_packs: int, item_expert: np.ndarray | None = None
) -> np.ndarray:
    """Pack each row's n items into `num_packs` packs of n / num_packs items, balancing loads.

    The greedy of DeepSeek EPLB's `balanced_packing`: items in decreasing load (tied items by
    index) each go to the lightest pack that is not full (the first such pack on ties). With
    `item_expert`, items are expert-major replicas (an expert's replicas have consecutive
    indices and equal loads, so they come one after another as a *run*), and each replica goes
    to the lightest non-full pack among those holding the fewest replicas of its expert;
    `spread_replicas` repairs what full packs left unavoidable.

    All rows advance together, one item per step, each step an argmin over the pack loads.
    A full pack carries load +inf, so the argmin skips it. A run's earlier replicas put a
    penalty on their packs (`run_penalty`, a power of two above twice the row's total, more
    than any load difference), kept in its own array and added to a copy of the loads only
    at steps that continue a run, so the loads stay exact. Steps run unchecked in chunks:
    full packs are found between chunks, and a chunk in which a pack filled up and then took
    another item is rolled back and redone with a check at every step.

    Args:
        weight: [X, n] float, each item's load; n a multiple of `num_packs`.
        num_packs: packs per row.
        item_expert: optional [X, n] int, the expert of each (expert-major) replica.

    Returns:
        item_at: [X, n] int64, the items in packed order: pack p holds the items at positions
        p * c .. p * c + c - 1 (c = n / num_packs), in the order the greedy gave them.
    """
    rows, num_items = weight.shape
    assert num_items % num_packs == 0, "items must fill the packs equally"
    capacity = num_items // num_packs
    if capacity == 1:
        return np.broadcast_to(np.arange(num_items, dtype=np.int64), (rows, num_items)).copy()

    weight = np.asarray(weight, dtype=np.float64)
    order = descending_order(weight)
    flat_order_by_step = order.T + np.arange(0, rows * num_items, num_items)
    step_weight = weight.take(flat_order_by_step)  # [n, X]: each row's item, by step
    pack_base = np.arange(0, rows * num_packs, num_packs)
    chosen = np.empty((num_items, rows), dtype=np.int64)  # per step: row * P + pack
    pack_load = np.zeros((rows, num_packs))
    load_flat = pack_load.reshape(-1)
    pack_count = np.zeros(rows * num_packs, dtype=np.int64)
    fills_up = np.zeros(capacity + 1)  # added to a pack's load when it takes its c-th item
    fills_up[capacity] = np.inf
    # run_mask[x, p]: the penalties of pack p for the replicas of row x's current run it holds.
    run_mask = np.zeros((rows, num_packs))
    run_flat = run_mask.reshape(-1)
    key = np.empty((rows, num_packs))  # loads plus penalties, at steps that continue a run
    # Loads are non-negative, never -0.0 (sums start at +0.0), and such floats (and +inf)
    # order like their bits: the integer argmin is faster.
    load_bits, key_bits = pack_load.view(np.int64), key.view(np.int64)
    if item_expert is None:
        continues_run = [False] * (num_items + 1)
    else:
        same_as_previous = np.zeros(weight.shape, dtype=bool)
        np.equal(item_expert[:, 1:], item_expert[:, :-1], out=same_as_previous[:, 1:])
        continues = same_as_previous.take(flat_order_by_step)  # [n, X]: continues a run
        continues_run = continues.any(axis=1).tolist() + [False]  # per step: in some row
        keep_marks = continues.astype(np.float64)[:, :, None]  # [n, X, 1]
        run_penalty = np.exp2(np.ceil(np.log2(2 * weight.sum(axis=1) + 1)))  # [X]

    def place_steps(start: int, end: int, checked: bool) -> None:
        for step in range(start, end):
            flat = chosen[step]
            if continues_run[step]:
                np.add(pack_load, run_mask, out=key)
                key_bits.argmin(axis=1, out=flat)
            else:
                load_bits.argmin(axis=1, out=flat)
            flat += pack_base
            if checked:
                items = pack_count.take(flat)
                items += 1
                pack_count[flat] = items
                load_flat[flat] += step_weight[step] + fills_up.take(items)
            else:
                load_flat[flat] += step_weight[step]
            if continues_run[step + 1]:  # mark the pack; clear rows whose next item starts a run
                if not continues_run[step]:
                    run_mask.fill(0.0)
                run_flat[flat] += run_penalty
                np.multiply(run_mask, keep_marks[step + 1], out=run_mask)

    step = 0
    if np.all(step_weight[num_packs - 2] > 0):
        # While every earlier item has a positive load, the first P items fill the P empty
        # packs in pack order (so replicas among them land in different packs).
        chosen[:num_packs] = np.arange(num_packs)[:, None] + pack_base
        pack_load[:] = np.abs(step_weight[:num_packs].T)  # abs: -0.0 to +0.0
        pack_count[:] = 1
        step = num_packs
        if continues_run[step]:
            # The run that step P continues holds the items of steps P-1, P-2, ... down to
            # its first: item i sits in pack i.
            in_run = np.cumprod(continues[num_packs:0:-1], axis=0)[::-1]  # [P, X]
            run_mask[:] = in_run.T * run_penalty[:, None]
    first_full_step = num_items
    fullest = int(pack_count.max())
    while step < num_items:
        # Speculate over about half the rounds left before a pack could fill.
        end = min(step + max(_CHUNK_STEPS, (capacity - fullest) * num_packs // 2), num_items)
        if fullest == capacity:
            first_full_step = min(first_full_step, step)
            load_flat[pack_count == capacity] = np.inf
        if capacity - fullest < 2:  # packs about to fill: check every step
            place_steps(step, end, checked=True)
            fullest = int(pack_count.max())
        else:
            saved_load, saved_marks = pack_load.copy(), run_mask.copy()
            place_steps(step, end, checked=False)
            count = pack_count + np.bincount(chosen[step:end].reshape(-1), minlength=load_flat.size)
            fullest = int(count.max())
            if fullest > capacity:  # a full pack took another item: redo, checked
                pack_load[:] = saved_load
                run_mask[:] = saved_marks
                first_full_step = min(first_full_step, step)
                place_steps(step, end, checked=True)
                fullest = int(pack_count.max())
            else:
                pack_count = count
        step = end

    # Packed order: sort each row's steps by (pack, step), that is by pack in arrival order.
    step_bits = (num_items - 1).bit_length()
    pack_key = (chosen.T - pack_base[:, None]) << step_bits
    pack_key |= np.arange(num_items)
    pack_key.sort(axis=1)
    pack_key &= (1 << step_bits) - 1
    item_at = take_rows(order, pack_key)
    if any(continues_run[first_full_step:]):  # replicas placed while packs were full
        spread_replicas(item_at, item_expert, weight, num_packs)
    return item_at


def spread_replicas(
    item_at: np.ndarray,
    item_expert: np.ndarray,
    item_load: np.ndarray,
    num_packs: int,
    preferred: np.ndarray | None = None,
) -> np.ndarray:
    """Swap items between packs until no pack holds too many replicas of one expert.

    "Too many" is more than ceil(r / num_packs) replicas of an expert with r replicas in the
    row; in particular no pack holds two replicas of an expert with at most `num_packs`. Each
    round fixes one surplus replica in every row that has one: it trades places with the item,
    among those whose move lowers the row's total surplus, that leaves the larger of the two
    packs' loads smallest (among the `preferred` items first, if given). Such an item always
    exists: were every item of a pack q below the
    expert's bound barred, q would hold no more other items than the surplus pack p, hence at
    least as many replicas of the expert as p, a contradiction. So the rounds end.

    Args:
        item_at: [X, n] int64, items in packed order (see `balanced_packing`); updated in place.
        item_expert: [X, n] int, the expert (0..n-1) of each item.
        item_load: [X, n] float, each item's load.
        num_packs: packs per row.
        preferred: [X, n] bool, items to trade places with before any other (the `tape`
            policy's new replicas: trading two of them moves no replica already in place), or
            None.

    Returns:
        `item_at`, repaired.
    """
    rows, num_items = item_at.shape
    capacity = num_items // num_packs
    expert_at = take_rows(np.asarray(item_expert, dtype=np.int64), item_at)
    load_at = take_rows(np.asarray(item_load, dtype=np.float64), item_at)
    pack_of = np.arange(num_items) // capacity  # the pack of each position
    cell = (np.arange(rows)[:, None] * num_packs + pack_of) * num_items + expert_at
    copies = np.bincount(cell.reshape(-1), minlength=rows * num_packs * num_items)
    copies = copies.reshape(rows, num_packs, num_items)  # [row, pack, expert]
    limit = -(-copies.sum(axis=1) // num_packs)  # [row, expert]: ceil(replicas / packs)
    pack_load = load_at.reshape(rows, num_packs, capacity).sum(axis=2)
    if preferred is not None:
        # more than any difference of loads: a preferred partner always wins
        detour = 2.0 * float(np.abs(load_at).sum(axis=1).max()) + 1.0
        preferred = np.asarray(preferred, dtype=bool)

    while True:
        surplus = copies > limit[:, None, :]
        bad = np.flatnonzero(surplus.any(axis=(1, 2)))
        if not len(bad):
            return item_at
        column = np.arange(len(bad))[:, None]
        pack, expert = np.divmod(surplus[bad].reshape(len(bad), -1).argmax(axis=1), num_items)
        slots = pack[:, None] * capacity + np.arange(capacity)
        position = slots[
            column[:, 0], (expert_at[bad[:, None], slots] == expert[:, None]).argmax(1)
        ]
        # Candidates: every position of the row; its pack (other) and expert (partner).
        other, partner = pack_of[None, :], expert_at[bad]
        bad_copies, bad_limit = copies[bad], limit[bad]
        valid = (
            (bad_copies[column, other, expert[:, None]] < bad_limit[column, expert[:, None]])
            & (partner != expert[:, None])
            & (
                (bad_copies[column, pack[:, None], partner] < bad_limit[column, partner])
                | (bad_copies[column, other, partner] > bad_limit[column, partner])
            )
        )
        delta = load_at[bad] - load_at[bad, position][:, None]  # load moving into `pack`
        worst = np.maximum(
            pack_load[bad, pack][:, None] + delta, pack_load[bad[:, None], other] - delta
        )
        if preferred is not None:
            worst = worst + np.where(take_rows(preferred[bad], item_at[bad]), 0.0, detour)
        swap = np.where(valid, worst, np.inf).argmin(axis=1)
        assert np.all(valid[column[:, 0], swap]), "a surplus replica always has a partner"
        there, partner = pack_of[swap], expert_at[bad, swap]
        copies[bad, pack, expert] -= 1
        copies[bad, there, expert] += 1
        copies[bad, there, partner] -= 1
        copies[bad, pack, partner] += 1
        moved = delta[column[:, 0], swap]
        pack_load[bad, pack] += moved
        pack_load[bad, there] -= moved
        for array in (item_at, expert_at, load_at):
            array[bad, position], array[bad, swap] = array[bad, swap], array[bad, position]


def replica_ranks(phy2log: np.ndarray, num_experts: int, priority: np.ndarray) -> np.ndarray:
    """[L, S] int64: each slot's rank among its expert's replicas, by `priority`, then slot.

    Args:
        phy2log: [L, S] int64, the expert of each slot.
        num_experts: E.
        priority: [L, S] non-negative int, lower first (for example 0 for a replica that should
            be the primary).
    """
    num_layers, num_slots = phy2log.shape
    slot_bits = (num_slots - 1).bit_length()
    priority_bits = max(int(priority.max()).bit_length(), 1)
    key = ((phy2log << priority_bits) | priority) << slot_bits | np.arange(num_slots)
    key.sort(axis=1)
    order = key & ((1 << slot_bits) - 1)
    sorted_experts = key >> (slot_bits + priority_bits)
    counts = np.zeros((num_layers, num_experts), dtype=np.int64)
    np.add.at(counts, (np.arange(num_layers)[:, None], phy2log), 1)
    first = np.cumsum(counts, axis=1) - counts
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(num_slots) - take_rows(first, sorted_experts), 1)
    return rank


def placement_from_ranks(phy2log: np.ndarray, rank: np.ndarray, num_experts: int) -> Placement:
    """A `Placement` whose `log2phy` lists each expert's slots by replica rank.

    Args:
        phy2log: [L, S] int64, the expert of each slot.
        rank: [L, S] int64, each slot's replica rank (0..count-1, distinct per expert).
        num_experts: E.
    """
    num_layers, num_slots = phy2log.shape
    width = int(rank.max()) + 1
    log2phy = np.full(num_layers * num_experts * width, -1, dtype=np.int64)
    cell = (phy2log + np.arange(0, num_layers * num_experts, num_experts)[:, None]) * width + rank
    log2phy[cell] = np.arange(num_slots)
    return Placement(phy2log, num_experts, log2phy=log2phy.reshape(num_layers, num_experts, width))
