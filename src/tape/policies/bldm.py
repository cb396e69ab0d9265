"""`bldm`: the balanced largest differencing method (Karmarkar-Karp with equal counts per GPU).

As in the seed notebook: sort the items by load, cut them into partitions of G consecutive
items (each item its own subset), then repeatedly take the two partitions with the largest
spread (max subset sum - min subset sum; on ties the later one in the seed's list order) and
merge them, pairing the lightest subset of one with the heaviest of the other. The last
partition's G subsets are the GPUs, each of k = S / G items. All layers merge together, one
merge per step (n / G - 1 steps).

With S == E the items are the experts (no replicas). With S > E the replica counts come first,
from DeepSeek EPLB's greedy (each spare slot to the expert with the largest load per replica),
and the items are the S replicas with their per-replica loads; replicas of one expert that land
on one GPU are then swapped apart (`spread_replicas`), so no GPU holds two replicas of an expert
unless the expert has more replicas than there are GPUs.
"""

from __future__ import annotations

import numpy as np

from tape.layout import Layout
from tape.placement import Placement
from tape.policies import register
from tape.policies.packing import (
    expert_major_replicas,
    placement_from_ranks,
    replica_counts,
    spread_replicas,
    take_rows,
)

__all__ = ["bldm", "bldm_packing"]


@register("bldm")
def bldm(weight: np.ndarray, layout: Layout) -> Placement:
    """BLDM placement of `weight` on `layout`.

    Args:
        weight: [L, E] float64, each expert's load.
        layout: the cluster.

    Returns:
        Placement with `log2phy` in replica-rank order.
    """
    num_experts = weight.shape[1]
    count = replica_counts(weight, layout.num_replicas)
    replica_load, replica_expert, replica_rank = expert_major_replicas(weight, count)
    replica_at = bldm_packing(replica_load, layout.num_gpus)
    spread_replicas(replica_at, replica_expert, replica_load, layout.num_gpus)
    phy2log = take_rows(replica_expert, replica_at)
    return placement_from_ranks(phy2log, take_rows(replica_rank, replica_at), num_experts)


def bldm_packing(weight: np.ndarray, num_packs: int) -> np.ndarray:
    """Balanced largest differencing of each row's n items into `num_packs` packs of n / P.

    Args:
        weight: [X, n] float, each item's load; n a multiple of `num_packs`.
        num_packs: P, packs per row.

    Returns:
        item_at: [X, n] int64, the items in packed order: pack p holds positions
        p * c .. p * c + c - 1 (c = n / P), lightest first.
    """
    rows, num_items = weight.shape
    num_partitions = num_items // num_packs
    order = np.argsort(weight, axis=1, kind="stable")  # ascending, ties by index
    row = np.arange(rows)
    # Partition i holds the sorted items i * P .. i * P + P - 1, one per subset. A subset is
    # named by one of its items (its representative); `parent` links merged subsets.
    sums = take_rows(np.asarray(weight, dtype=np.float64), order)
    sums = sums.reshape(rows, num_partitions, num_packs)
    representative = order.reshape(rows, num_partitions, num_packs)
    parent = np.broadcast_to(np.arange(num_items), (rows, num_items)).copy()
    list_position = np.broadcast_to(np.arange(num_partitions), (rows, num_partitions)).copy()
    alive = np.ones((rows, num_partitions), dtype=bool)

    for merge in range(num_partitions - 1):
        spread = np.where(alive, sums.max(axis=2) - sums.min(axis=2), -np.inf)
        first = _last_largest(spread, list_position)
        spread[row, first] = -np.inf
        second = _last_largest(spread, list_position)
        sums_first, sums_second = sums[row, first], sums[row, second]
        up = np.argsort(sums_first, axis=1, kind="stable")
        down = np.argsort(sums_second, axis=1, kind="stable")[:, ::-1]
        merged_representative = take_rows(representative[row, first], up)
        parent_flat = parent.reshape(-1)
        absorbed = take_rows(representative[row, second], down)
        parent_flat[absorbed + (row * num_items)[:, None]] = merged_representative
        sums[row, first] = take_rows(sums_first, up) + take_rows(sums_second, down)
        representative[row, first] = merged_representative
        list_position[row, first] = num_partitions + merge
        alive[row, second] = False

    root = parent
    while True:
        next_root = take_rows(root, root)
        if np.array_equal(next_root, root):
            break
        root = next_root
    # [rows, num_packs]: the final subsets in order
    last = representative[row, alive.argmax(axis=1)]
    pack_of_root = np.zeros((rows, num_items), dtype=np.int64)
    pack_of_root[row[:, None], last] = np.arange(num_packs)
    pack = take_rows(pack_of_root, root)  # [X, n]: each item's pack
    # Packed order: items by (pack, load rank), so each pack lists its items lightest first.
    load_rank = np.empty_like(order)
    load_rank[row[:, None], order] = np.arange(num_items)
    by_pack = np.argsort(pack * num_items + load_rank, axis=1)
    return by_pack


def _last_largest(spread: np.ndarray, list_position: np.ndarray) -> np.ndarray:
    """[X] int64: the partition with the largest spread, the latest in list order on ties."""
    largest = spread == spread.max(axis=1, keepdims=True)
    return np.where(largest, list_position, -1).argmax(axis=1)
