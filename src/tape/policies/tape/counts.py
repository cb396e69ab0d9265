"""Replica counts for the `tape` policy: how many slots each expert gets.

Every expert gets one replica. Each of the S - E spare slots then goes, one at a time, to the
replica with the highest value, the j-th replica (j >= 2) of expert e being worth

    load[e] / (j - 1)                       the per-replica load it splits (DeepSeek EPLB's greedy)
  + node_spread * load[e] / N * [j <= N]    it can sit in one more node: locality dispatch then
                                            keeps that node's tokens, load[e] / N, inside it
  + keep_margin * mean GPU load * [j <= previous count]
                                            it already exists (moving it costs a weight copy).

The greedy itself is `tape.policies.packing.replica_counts` (one selection per layer), the one
the deepseek and bldm policies use without the two bonuses (EPLB's `replicate_experts`); this
module states the bonuses in the policy's units. No expert gets more replicas than there are
GPUs: the policy keeps an expert's replicas on distinct GPUs.
"""

from __future__ import annotations

import numpy as np

from tape.layout import Layout
from tape.policies import packing

__all__ = ["replica_counts"]


def replica_counts(
    load: np.ndarray,
    layout: Layout,
    *,
    node_spread: float,
    keep_margin: float,
    previous_counts: np.ndarray | None,
) -> np.ndarray:
    """Replica counts that spend the spare slots on the most valuable replicas (module doc).

    Args:
        load: [L, E] float64, forecast tokens per expert.
        layout: the cluster (S slots, G GPUs, N nodes); E <= S <= E * G.
        node_spread: worth of each inter-node token a replica saves by adding a node (load / N
            of them), relative to the load it splits.
        keep_margin: bonus of an existing replica, as a fraction of the layer's mean GPU load.
        previous_counts: [L, E] int64, the replica counts in force, or None.

    Returns:
        [L, E] int64 counts in [1, G], each layer summing to S.
    """
    nodes = layout.num_nodes
    keep = previous_counts is not None and keep_margin > 0
    return packing.replica_counts(
        np.asarray(load, dtype=np.float64),
        layout.num_replicas,
        max_replicas=layout.num_gpus,
        node_bonus=node_spread / nodes if nodes >= 2 else 0.0,
        num_nodes=nodes,
        keep_bonus=keep_margin / layout.num_gpus * load.sum(axis=1) if keep else None,
        previous_counts=previous_counts if keep else None,
    )
