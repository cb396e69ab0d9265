"""Expert-parallel load balancer: the starting point of `tape evolve`.

`rebalance_experts` has DeepSeek EPLB's contract. Given each logical expert's load in a window of
forward steps, it decides which expert every physical slot holds:

    weight[L, E]      tokens routed to each of the E experts of each of the L MoE layers.
    num_replicas      S, physical slots per layer (S >= E); slot s lives on GPU s // (S / G).
    num_groups        experts come in this many equal groups of consecutive ids.
    num_nodes         N; GPU g lives on node g // (G / N).
    num_gpus          G.

It returns `phy2log[L, S]` (the expert of each slot), `log2phy[L, E, X]` (the slots of each
expert, padded with -1; the first is the expert's primary copy) and `logcnt[L, E]` (replicas
of each expert, every expert >= 1).

The policy below is DeepSeek EPLB's hierarchical one, written in numpy: pack expert groups onto
nodes, replicate the heaviest experts within each node, then pack each node's replicas onto its
GPUs. Only the code between the EVOLVE-BLOCK markers is evolved.
"""

import numpy as np

# EVOLVE-BLOCK-START


def balanced_packing(weight, num_packs):
    """Split each row's items into `num_packs` packs of equal item count, balancing their sums.

    Heaviest item first, each to the lightest pack that still has room.
    weight: [R, n] with n a multiple of num_packs. Returns pack [R, n] and rank [R, n] (the
    item's position inside its pack).
    """
    rows, items = weight.shape
    capacity = items // num_packs
    pack = np.empty((rows, items), dtype=np.int64)
    rank = np.empty((rows, items), dtype=np.int64)
    for row in range(rows):
        loads = np.zeros(num_packs)
        counts = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[row], kind="stable"):
            open_loads = np.where(counts < capacity, loads, np.inf)
            chosen = int(np.argmin(open_loads))
            pack[row, item] = chosen
            rank[row, item] = counts[chosen]
            loads[chosen] += weight[row, item]
            counts[chosen] += 1
    return pack, rank


def replicate(weight, num_slots):
    """Give each row's n experts `num_slots` replicas: one each, then the rest greedily.

    Each spare slot goes to the expert with the largest load per replica.
    weight: [R, n]. Returns slot_expert [R, num_slots], slot_rank [R, num_slots] (which replica
    of its expert the slot holds) and count [R, n].
    """
    rows, experts = weight.shape
    slot_expert = np.zeros((rows, num_slots), dtype=np.int64)
    slot_rank = np.zeros((rows, num_slots), dtype=np.int64)
    count = np.ones((rows, experts), dtype=np.int64)
    slot_expert[:, :experts] = np.arange(experts)
    every_row = np.arange(rows)
    for slot in range(experts, num_slots):
        chosen = np.argmax(weight / count, axis=1)
        slot_expert[:, slot] = chosen
        slot_rank[:, slot] = count[every_row, chosen]
        count[every_row, chosen] += 1
    return slot_expert, slot_rank, count


def inverse(permutation):
    """Row-wise inverse of a batch of permutations [R, n]."""
    result = np.empty_like(permutation)
    np.put_along_axis(result, permutation, np.arange(permutation.shape[1])[None, :], axis=1)
    return result


def hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus):
    """Groups to nodes, replicas within nodes, replicas to GPUs. Returns phy2log, rank, logcnt."""
    layers, experts = weight.shape
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_replicas // num_gpus
    experts_per_node = experts // num_nodes

    # 1. Whole groups onto nodes. "Node order" numbers experts node by node.
    group_load = weight.reshape(layers, num_groups, group_size).sum(axis=2)
    group_node, group_rank = balanced_packing(group_load, num_nodes)
    group_start = (group_node * groups_per_node + group_rank) * group_size
    to_node_order = (group_start[:, :, None] + np.arange(group_size)).reshape(layers, experts)
    from_node_order = inverse(to_node_order)

    # 2. Replicate the experts of each node into its share of the slots.
    node_weight = np.take_along_axis(weight, from_node_order, axis=1)
    node_weight = node_weight.reshape(layers * num_nodes, experts_per_node)
    slot_expert, slot_rank, count = replicate(node_weight, num_replicas // num_nodes)

    # 3. Pack each node's replicas onto its GPUs, equal slots per GPU.
    replica_load = np.take_along_axis(node_weight / count, slot_expert, axis=1)
    gpu, gpu_rank = balanced_packing(replica_load, gpus_per_node)
    position = inverse(gpu * slots_per_gpu + gpu_rank)
    slot_expert = np.take_along_axis(slot_expert, position, axis=1)
    slot_rank = np.take_along_axis(slot_rank, position, axis=1).reshape(layers, -1)

    node_offset = np.arange(num_nodes)[None, :, None] * experts_per_node
    node_ordered = (slot_expert.reshape(layers, num_nodes, -1) + node_offset).reshape(layers, -1)
    phy2log = np.take_along_axis(from_node_order, node_ordered, axis=1)
    logcnt = np.take_along_axis(count.reshape(layers, -1), to_node_order, axis=1)
    return phy2log, slot_rank, logcnt


def balance(weight, num_replicas, num_groups, num_nodes, num_gpus):
    """The placement of `weight` [L, E]: (phy2log, log2phy, logcnt)."""
    if num_groups % num_nodes == 0:
        phy2log, rank, logcnt = hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus
        )
    else:  # groups cannot be packed whole onto nodes: balance globally
        phy2log, rank, logcnt = hierarchical(weight, num_replicas, 1, 1, num_gpus)
    layers, experts = weight.shape
    log2phy = np.full((layers, experts, int(logcnt.max())), -1, dtype=np.int64)
    every_layer = np.arange(layers)[:, None]
    log2phy[every_layer, phy2log, rank] = np.arange(num_replicas)[None, :]
    return phy2log, log2phy, logcnt


# EVOLVE-BLOCK-END


def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    """DeepSeek EPLB's entry point: (phy2log, log2phy, logcnt) for `weight` [L, E]."""
    weight = np.asarray(weight, dtype=np.float64)
    return balance(weight, num_replicas, num_groups, num_nodes, num_gpus)
