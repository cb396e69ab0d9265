"""A numpy reading of vLLM's current default EPLB policy (`DefaultEplbPolicy`, vLLM 0.33.0).

vLLM's default policy is DeepSeek's hierarchical algorithm written in numpy, followed by a pass
that keeps experts in the slots they had on the same GPU. This reading does the same steps with
the same numpy operations, so that `benchmarks/bench_policies.py` can time it where vLLM is not
installed; `tests/engines/test_vllm.py` checks that it places exactly as vLLM's own class. Where
it differs from `reference_eplb.py` (DeepSeek's reference read in numpy), it follows vLLM:

- loads are float32 (`weight.float()`), but a replica's load is the float32 load divided by an
  int64 count, which numpy computes in float64;
- items go by decreasing load in the order of numpy's default (not stable) sort, each to the
  lightest pack that is not full (`argmin` over the packs' loads, a full pack's set to inf);
- only `phy2log` is returned;
- given the map in force (`old_phy2log`, same shape), each GPU's slots are rearranged: a slot
  whose old expert the GPU still holds keeps it, and the experts the GPU gains fill its other
  slots in order.

Not part of the package: nothing in `src/` imports it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["keep_slots_on_gpu", "rebalance_experts"]


def _pack(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """[X, n] loads -> the pack of each item and its rank in the pack ([X, n] int64 each); n /
    num_packs items a pack, greedily, heaviest item first, to the lightest pack not full."""
    num_rows, num_items = weight.shape
    per_pack = num_items // num_packs
    if per_pack == 1:
        index = np.tile(np.arange(num_items, dtype=np.int64), (num_rows, 1))
        return index, np.zeros_like(index)
    order = np.argsort(-weight, axis=-1)
    pack_of = np.full((num_rows, num_items), -1, dtype=np.int64)
    rank_of = np.full((num_rows, num_items), -1, dtype=np.int64)
    loads = np.zeros((num_rows, num_packs), dtype=np.float64)
    counts = np.zeros((num_rows, num_packs), dtype=np.int64)
    for row in range(num_rows):
        row_loads, row_counts = loads[row], counts[row]
        for item in order[row]:
            pack = int(np.argmin(row_loads))
            pack_of[row, item] = pack
            rank_of[row, item] = row_counts[pack]
            row_loads[pack] += weight[row, item]
            row_counts[pack] += 1
            if row_counts[pack] == per_pack:
                row_loads[pack] = np.inf
    return pack_of, rank_of


def _replicate(weight: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """[X, n] loads -> the item of each of `num_slots` slots and each item's replica count: each
    extra slot to the item of the largest load per replica."""
    num_rows, num_items = weight.shape
    slot_item = np.tile(np.arange(num_slots, dtype=np.int64), (num_rows, 1))
    count = np.ones((num_rows, num_items), dtype=np.int64)
    rows = np.arange(num_rows)
    for slot in range(num_items, num_slots):
        chosen = np.argmax(weight / count, axis=-1)
        slot_item[:, slot] = chosen
        count[rows, chosen] += 1
    return slot_item, count


def _inverse(permutation: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(permutation)
    inverse[np.arange(permutation.shape[0])[:, None], permutation] = np.arange(
        permutation.shape[1], dtype=np.int64)
    return inverse


def _hierarchical(weight: np.ndarray, num_slots: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> np.ndarray:
    """DeepSeek's hierarchical placement: groups to nodes, replicas within each node, slots to
    the node's GPUs. [L, E] float32 loads in, phy2log [L, num_slots] out."""
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_slots // num_gpus
    group_node, group_rank = _pack(weight.reshape(num_layers, num_groups, group_size).sum(-1),
                                   num_nodes)
    # experts renumbered node by node ("node-major" ids), and back
    to_node_major = (((group_node * groups_per_node + group_rank)[..., None] * group_size)
                     + np.arange(group_size, dtype=np.int64)).reshape(num_layers, num_experts)
    from_node_major = _inverse(to_node_major)
    node_loads = np.take_along_axis(weight, from_node_major, axis=1).reshape(
        -1, num_experts // num_nodes)
    slot_expert, count = _replicate(node_loads, num_slots // num_nodes)
    replica_loads = np.take_along_axis(node_loads / count, slot_expert, axis=1)
    gpu, rank = _pack(replica_loads, num_gpus // num_nodes)
    placed_from = _inverse(gpu * slots_per_gpu + rank)
    placed = np.take_along_axis(slot_expert, placed_from, axis=1)
    placed = (placed.reshape(num_layers, num_nodes, -1)
              + np.arange(0, num_experts, num_experts // num_nodes,
                          dtype=np.int64)[None, :, None]).reshape(num_layers, -1)
    return np.take_along_axis(from_node_major, placed, axis=1)


def keep_slots_on_gpu(phy2log: np.ndarray, num_gpus: int, old_phy2log: np.ndarray
                      ) -> np.ndarray:
    """`phy2log` [L, S] with each GPU's slots rearranged so that an expert the GPU held in the
    map in force `old_phy2log` [L, S] stays in its old slot; the GPU's other experts fill its
    other slots in order. Batched over layers, one GPU and one old slot at a time."""
    num_layers, num_slots = phy2log.shape
    per_gpu = num_slots // num_gpus
    result = phy2log.copy()
    layers = np.arange(num_layers)
    positions = np.tile(np.arange(per_gpu), (num_layers, 1))
    for gpu in range(num_gpus):
        first = gpu * per_gpu
        new = phy2log[:, first:first + per_gpu]
        old = old_phy2log[:, first:first + per_gpu]
        taken = np.zeros((num_layers, per_gpu), dtype=bool)
        kept = np.zeros((num_layers, per_gpu), dtype=bool)
        for slot in range(per_gpu):
            match = (new == old[:, slot, None]) & ~taken
            found = match.any(axis=1)
            source = np.argmax(match, axis=1)[found]
            rows = layers[found]
            result[rows, first + slot] = new[rows, source]
            taken[rows, source] = True
            kept[rows, slot] = True
        if taken.all():
            continue
        sources = np.argsort(np.where(~taken, positions, per_gpu + 1), axis=1)
        targets = np.argsort(np.where(~kept, positions, per_gpu + 1), axis=1)
        moving = np.minimum((~taken).sum(axis=1), (~kept).sum(axis=1))
        for row in range(num_layers):
            count = int(moving[row])
            if count:
                result[row, first + targets[row, :count]] = new[row, sources[row, :count]]
    return result


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, old_phy2log: np.ndarray | None = None) -> np.ndarray:
    """vLLM's default policy: hierarchical when groups % nodes == 0, else global (one group,
    one node); then `keep_slots_on_gpu` when the map in force is given with the same shape.

    Args:
        weight: [L, E] loads (any numbers; read as float32).
        num_replicas: S, a multiple of `num_gpus`.
        num_groups, num_nodes, num_gpus: the cluster.
        old_phy2log: optional [L, S] int64 map in force.

    Returns:
        phy2log: [L, S] int64.
    """
    weight = np.asarray(weight).astype(np.float32)
    if num_groups % num_nodes == 0:
        phy2log = _hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log = _hierarchical(weight, num_replicas, 1, 1, num_gpus)
    if old_phy2log is not None and np.shape(old_phy2log) == phy2log.shape:
        phy2log = keep_slots_on_gpu(phy2log, num_gpus, np.asarray(old_phy2log))
    return phy2log
