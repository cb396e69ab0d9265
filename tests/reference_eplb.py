"""A plain numpy reading of DeepSeek EPLB's `eplb.py` (deepseek-ai/EPLB), kept loop for loop.

It is the speed and quality reference for TAPE's `deepseek` policy (tests and benchmarks): the
same greedy order, the same float32 arithmetic (the reference calls `weight.float()`, and torch
divides float32 by int64 counts in float32, so counts are cast first here), and the same
tie-breaking as far as numpy allows (sorts are stable, so tied items keep index order;
`min` and `argmax` take the first of tied packs and experts). It keeps the reference's known
flaw: its packing may put two replicas of one expert on one GPU (deepseek-ai/EPLB issue 22).

Not part of the package: nothing in `src/` imports it.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "balanced_packing",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n weighted items of each row into `num_packs` packs of n / num_packs items.

    Args:
        weight: [X, n] float32, the weight of each item.
        num_packs: number of packs.

    Returns:
        pack_index: [X, n] int64, the pack of each item.
        rank_in_pack: [X, n] int64, the item's rank in its pack.
    """
    num_layers, num_groups = weight.shape
    assert num_groups % num_packs == 0
    groups_per_pack = num_groups // num_packs

    if groups_per_pack == 1:
        pack_index = np.broadcast_to(np.arange(num_groups, dtype=np.int64), weight.shape).copy()
        rank_in_pack = np.zeros(weight.shape, dtype=np.int64)
        return pack_index, rank_in_pack

    indices = np.argsort(-weight.astype(np.float32), axis=-1, kind="stable")
    pack_index = np.full(weight.shape, -1, dtype=np.int64)
    rank_in_pack = np.full(weight.shape, -1, dtype=np.int64)
    for i in range(num_layers):
        pack_weights = [0] * num_packs
        pack_items = [0] * num_packs
        for group in indices[i]:
            pack = min(
                (p for p in range(num_packs) if pack_items[p] < groups_per_pack),
                key=pack_weights.__getitem__,
            )
            assert pack_items[pack] < groups_per_pack
            pack_index[i, group] = pack
            rank_in_pack[i, group] = pack_items[pack]
            pack_weights[pack] += weight[i, group]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(
    weight: np.ndarray, num_phy: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate `num_log` experts to `num_phy` replicas, minimising the largest replica load.

    Args:
        weight: [X, num_log] float32.
        num_phy: total number of replicas.

    Returns:
        phy2log: [X, num_phy] int64, the logical expert of each replica.
        rank: [X, num_phy] int64, the replica rank.
        logcnt: [X, num_log] int64, replicas of each logical expert.
    """
    n, num_log = weight.shape
    num_redundant = num_phy - num_log
    assert num_redundant >= 0
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (n, 1))
    rank = np.zeros((n, num_phy), dtype=np.int64)
    logcnt = np.ones((n, num_log), dtype=np.int64)
    arangen = np.arange(n, dtype=np.int64)
    for i in range(num_log, num_phy):
        redundant_indices = (weight / logcnt.astype(weight.dtype)).argmax(axis=-1)
        phy2log[:, i] = redundant_indices
        rank[:, i] = logcnt[arangen, redundant_indices]
        logcnt[arangen, redundant_indices] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(
        inv, perm, np.broadcast_to(np.arange(perm.shape[1], dtype=np.int64), perm.shape), 1
    )
    return inv


def rebalance_experts_hierarchical(
    weight: np.ndarray,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference's hierarchical policy.

    Args:
        weight: [num_moe_layers, num_logical_experts] float32.
        num_physical_experts: replicas after replication.
        num_groups: expert groups.
        num_nodes: server nodes.
        num_gpus: GPUs, a multiple of `num_nodes`.

    Returns:
        physical_to_logical_map: [L, num_physical_experts] int64.
        physical_rank: [L, num_physical_experts] int64, the replica rank of each slot.
        logical_count: [L, num_logical_experts] int64.
    """
    num_layers, num_logical_experts = weight.shape
    assert num_logical_experts % num_groups == 0
    group_size = num_logical_experts // num_groups
    assert num_groups % num_nodes == 0
    groups_per_node = num_groups // num_nodes
    assert num_gpus % num_nodes == 0
    assert num_physical_experts % num_gpus == 0
    phy_experts_per_gpu = num_physical_experts // num_gpus

    # Step 1: pack groups to nodes
    tokens_per_group = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack_index, group_rank_in_pack = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (
        ((group_pack_index * groups_per_node + group_rank_in_pack) * group_size)[:, :, None]
        + np.arange(group_size, dtype=np.int64)
    ).reshape(num_layers, -1)
    mlog2log = _inverse(log2mlog)

    # Step 2: construct redundant experts within nodes
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, -1).reshape(
        -1, num_logical_experts // num_nodes
    )
    phy2mlog, phyrank, mlogcnt = replicate_experts(
        tokens_per_mlog, num_physical_experts // num_nodes
    )

    # Step 3: pack physical_experts to GPUs
    tokens_per_phy = np.take_along_axis(
        tokens_per_mlog / mlogcnt.astype(tokens_per_mlog.dtype), phy2mlog, -1
    )
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_experts_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)
    pphy2mlog = (
        pphy2mlog.reshape(num_layers, num_nodes, -1)
        + np.arange(0, num_logical_experts, num_logical_experts // num_nodes).reshape(1, -1, 1)
    ).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, -1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, -1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: np.ndarray,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference's entry point: hierarchical when groups % nodes == 0, else global.

    Args:
        weight: [layers, num_logical_experts], the load of each logical expert.
        num_replicas: physical experts, a multiple of `num_gpus`.
        num_groups: expert groups.
        num_nodes: server nodes.
        num_gpus: GPUs, a multiple of `num_nodes`.

    Returns:
        physical_to_logical_map: [layers, num_replicas] int64.
        logical_to_physical_map: [layers, num_logical_experts, X] int64, padded with -1.
        expert_count: [layers, num_logical_experts] int64.
    """
    num_layers, num_logical_experts = weight.shape
    weight = np.asarray(weight).astype(np.float32)
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, 1, 1, num_gpus
        )
    maxlogcnt = int(logcnt.max())
    log2phy = np.full((num_layers, num_logical_experts * maxlogcnt), -1, dtype=np.int64)
    np.put_along_axis(
        log2phy,
        phy2log * maxlogcnt + phyrank,
        np.broadcast_to(np.arange(num_replicas, dtype=np.int64), (num_layers, num_replicas)),
        -1,
    )
    return phy2log, log2phy.reshape(num_layers, num_logical_experts, maxlogcnt), logcnt
