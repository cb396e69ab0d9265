"""`deepseek`: DeepSeek EPLB's policy (deepseek-ai/EPLB `eplb.py`), batched and fixed.

Hierarchical when `num_groups % num_nodes == 0`, else global (one group, one node):

1. pack whole expert groups onto nodes with balanced packing (equal group counts per node);
2. within each node, replicate experts greedily: each spare slot goes to the expert with the
   largest load per replica;
3. pack each node's replicas onto its GPUs with balanced packing (equal slot counts per GPU).

Same greedy order and tie-breaking as the reference, loads per replica compared in float32 as
its `weight.float()` makes them, so the replica counts, and therefore every slot load and the
largest slot load, are the reference's (exactly so while float32 holds the group sums, as it
does token counts below 2**24; the reference adds them in float32, here in float64).

One deliberate difference, in step 3:
the reference may put two replicas of one expert on one GPU (deepseek-ai/EPLB issue 22), which
wastes a slot. Here a replica goes to the lightest non-full GPU among those holding the fewest
replicas of its expert, and a repair swap fixes what the greedy could not avoid, so no GPU holds
two replicas of an expert unless the expert has more replicas than its node has GPUs (then no GPU
holds more than ceil(replicas / GPUs per node)). Otherwise the packing is the reference's
greedy (tied replicas taken expert by expert).

What never doubling up costs in GPU balance against the reference, measured: docs/policies.md.

Where loads tie, `phy2log` may also differ from the reference's when it doubles nothing up:
tied replicas are taken expert by expert here, while the reference lists every expert's first
replica before the extra ones and sorts with torch's unstable sort. The tied items then trade
places, with the same slot loads.

`log2phy` lists each expert's slots in replica-rank order, like the reference; as an expert's
replicas carry equal loads, which slot gets which rank (and so the primary) may differ from the
reference's, whose order among them is its unstable sort's.
"""

from __future__ import annotations

import numpy as np

from tape.layout import Layout
from tape.placement import Placement
from tape.policies import register
from tape.policies.packing import (
    balanced_packing,
    expert_major_replicas,
    placement_from_ranks,
    replica_counts,
    take_rows,
)

__all__ = ["deepseek", "hierarchical_placement"]


@register("deepseek")
def deepseek(weight: np.ndarray, layout: Layout) -> Placement:
    """DeepSeek EPLB's placement of `weight` on `layout`.

    Args:
        weight: [L, E] float64, each expert's load (tokens) in the window to balance.
        layout: the cluster; E must be a multiple of `layout.num_groups`.

    Returns:
        Placement with `log2phy` in replica-rank order.
    """
    if layout.num_groups % layout.num_nodes == 0:
        num_groups, num_nodes = layout.num_groups, layout.num_nodes
    else:
        num_groups, num_nodes = 1, 1
    phy2log, rank = hierarchical_placement(weight, layout, num_groups, num_nodes)
    return placement_from_ranks(phy2log, rank, weight.shape[1])


def hierarchical_placement(
    weight: np.ndarray, layout: Layout, num_groups: int, num_nodes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The three steps of the module docstring for `num_groups` groups on `num_nodes` nodes.

    Args:
        weight: [L, E] float64.
        layout: gives the slots (S) and GPUs (G).
        num_groups: groups of consecutive experts; a multiple of `num_nodes`, divides E.
        num_nodes: nodes; divides G.

    Returns:
        phy2log: [L, S] int64, the expert of each slot.
        rank: [L, S] int64, each slot's replica rank.
    """
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    experts_per_node = num_experts // num_nodes
    slots_per_node = layout.num_replicas // num_nodes
    gpus_per_node = layout.num_gpus // num_nodes

    # Step 1: groups to nodes. node_order[l, i] is the expert at position i of the node-major
    # order: node 0's groups first, each group's experts in id order.
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(axis=2)
    group_at = balanced_packing(group_load, num_nodes)
    node_order = (group_at[:, :, None] * group_size + np.arange(group_size)).reshape(
        num_layers, num_experts
    )

    # Step 2: replicas within nodes; one row per (layer, node), experts by local index.
    local_load = take_rows(weight, node_order).reshape(-1, experts_per_node)
    # Loads per replica compared in float32, as the reference's `weight.float() / logcnt`.
    local_count = replica_counts(local_load.astype(np.float32), slots_per_node)
    replica_load, replica_expert, replica_rank = expert_major_replicas(local_load, local_count)

    # Step 3: each node's replicas to its GPUs; replica_at[row, i] is the replica in the
    # node's slot i.
    replica_at = balanced_packing(replica_load, gpus_per_node, item_expert=replica_expert)

    node_offset = (np.arange(num_nodes) * experts_per_node)[None, :, None]
    local_expert = take_rows(replica_expert, replica_at).reshape(num_layers, num_nodes, -1)
    phy2log = take_rows(node_order, (local_expert + node_offset).reshape(num_layers, -1))
    rank = take_rows(replica_rank, replica_at).reshape(num_layers, -1)
    return phy2log, rank
