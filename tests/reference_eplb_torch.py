"""A torch reading of DeepSeek EPLB's `eplb.py` (deepseek-ai/EPLB), operation for operation.

The reference is torch code, and its cost is the cost of its operations: a Python loop over
layers and items in `balanced_packing` whose every step indexes, compares and adds 0-d torch
tensors, one `max` over `weight / logcnt` per redundant slot in `replicate_experts`, then
gathers and scatters. This module does the same operations in the same order (torch tensors
on the CPU, the same sorts, reductions, gathers and scatters), so timing it times the
reference. `tests/reference_eplb.py` is the numpy reading of the same algorithm (same
results, faster loops); `benchmarks/bench_policies.py` times TAPE's `deepseek` against both.

Not part of the package: nothing in `src/` imports it, and only this file imports torch.
"""

from __future__ import annotations

import torch

__all__ = [
    "balanced_packing",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the n items of each row into `num_packs` packs of n / num_packs items each.

    Greedy: items by decreasing load (`weight.float()` sorted descending), each to the lightest
    pack that is not full. Pack loads are Python lists holding 0-d tensors, as in the reference.

    Args:
        weight: [X, n] float tensor, each item's load; n a multiple of `num_packs`.
        num_packs: packs per row.

    Returns:
        pack_index: [X, n] int64, the pack of each item.
        rank_in_pack: [X, n] int64, the item's position in its pack (arrival order).
    """
    num_rows, num_items = weight.shape
    assert num_items % num_packs == 0
    capacity = num_items // num_packs

    if capacity == 1:
        pack_index = torch.arange(num_items, dtype=torch.int64, device=weight.device).expand(
            weight.shape
        )
        rank_in_pack = torch.zeros_like(weight, dtype=torch.int64)
        return pack_index, rank_in_pack

    order = weight.float().sort(-1, descending=True).indices.cpu()
    pack_index = torch.full_like(weight, fill_value=-1, dtype=torch.int64, device="cpu")
    rank_in_pack = torch.full_like(pack_index, fill_value=-1)
    for row in range(num_rows):
        pack_load = [0] * num_packs
        pack_size = [0] * num_packs
        for item in order[row]:
            pack = min(
                (p for p in range(num_packs) if pack_size[p] < capacity),
                key=pack_load.__getitem__,
            )
            assert pack_size[pack] < capacity
            pack_index[row, item] = pack
            rank_in_pack[row, item] = pack_size[pack]
            pack_load[pack] += weight[row, item]
            pack_size[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(
    weight: torch.Tensor, num_physical: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each row's experts `num_physical` replicas in all, minimising the largest load
    per replica: every redundant replica goes to the expert of largest `weight / count`.

    Args:
        weight: [X, num_logical] float tensor.
        num_physical: replicas per row, at least num_logical.

    Returns:
        phy2log: [X, num_physical] int64, the expert of each replica.
        rank: [X, num_physical] int64, the replica's rank among its expert's.
        logcnt: [X, num_logical] int64, replicas of each expert.
    """
    num_rows, num_logical = weight.shape
    assert num_physical >= num_logical
    device = weight.device
    phy2log = torch.arange(num_physical, dtype=torch.int64, device=device).repeat(num_rows, 1)
    rank = torch.zeros(num_rows, num_physical, dtype=torch.int64, device=device)
    logcnt = torch.ones(num_rows, num_logical, dtype=torch.int64, device=device)
    rows = torch.arange(num_rows, dtype=torch.int64, device=device)
    for replica in range(num_logical, num_physical):
        hottest = (weight / logcnt).max(dim=-1).indices
        phy2log[:, replica] = hottest
        rank[:, replica] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(permutation: torch.Tensor) -> torch.Tensor:
    """[X, n] int64: the inverse of each row's permutation (a scatter)."""
    inverse = torch.empty_like(permutation)
    inverse.scatter_(
        1,
        permutation,
        torch.arange(permutation.size(1), dtype=torch.int64, device=permutation.device).expand(
            permutation.shape
        ),
    )
    return inverse


def rebalance_experts_hierarchical(
    weight: torch.Tensor,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups to nodes, replicas within nodes, replicas to GPUs.

    "mlog" numbers experts node-major after step 1 (node 0's experts first); "phy" numbers a
    node's replicas as `replicate_experts` made them; "pphy" numbers slots after step 3.

    Args:
        weight: [L, E] float32 tensor.
        num_physical_experts: slots S, a multiple of `num_gpus`.
        num_groups: groups of consecutive experts, a multiple of `num_nodes`.
        num_nodes: nodes, dividing `num_gpus`.
        num_gpus: GPUs.

    Returns:
        phy2log: [L, S] int64, the expert of each slot.
        phyrank: [L, S] int64, each slot's replica rank.
        logcnt: [L, E] int64, replicas of each expert.
    """
    num_layers, num_logical = weight.shape
    assert num_logical % num_groups == 0
    group_size = num_logical // num_groups
    assert num_groups % num_nodes == 0
    groups_per_node = num_groups // num_nodes
    assert num_gpus % num_nodes == 0
    assert num_physical_experts % num_gpus == 0
    slots_per_gpu = num_physical_experts // num_gpus

    # Step 1: whole groups to nodes.
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (
        ((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
        + torch.arange(group_size, dtype=torch.int64, device=group_pack.device)
    ).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicas within each node; one row per (layer, node).
    mlog_load = weight.gather(-1, mlog2log).view(-1, num_logical // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, num_physical_experts // num_nodes)

    # Step 3: each node's replicas to its GPUs.
    phy_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    pack, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    phy2pphy = pack * slots_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    pphy2mlog = (
        pphy2mlog.view(num_layers, num_nodes, -1)
        + torch.arange(0, num_logical, num_logical // num_nodes, device=group_pack.device).view(
            1, -1, 1
        )
    ).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's entry point: hierarchical when groups % nodes == 0, else global.

    Args:
        weight: [L, E] tensor, each expert's load.
        num_replicas: slots S, a multiple of `num_gpus`.
        num_groups: expert groups.
        num_nodes: nodes.
        num_gpus: GPUs, a multiple of `num_nodes`.

    Returns:
        phy2log: [L, S] int64, the expert of each slot.
        log2phy: [L, E, X] int64, each expert's slots by replica rank, padded with -1.
        logcnt: [L, E] int64, replicas of each expert.
    """
    num_layers, num_logical = weight.shape
    weight = weight.float().cpu()
    if num_groups % num_nodes == 0:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:
        phy2log, phyrank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, 1, 1, num_gpus
        )
    width = logcnt.max().item()
    log2phy = torch.full(
        (num_layers, num_logical, width), -1, dtype=torch.int64, device=logcnt.device
    )
    log2phy.view(num_layers, -1).scatter_(
        -1,
        phy2log * width + phyrank,
        torch.arange(num_replicas, dtype=torch.int64, device=log2phy.device).expand(num_layers, -1),
    )
    return phy2log, log2phy, logcnt
