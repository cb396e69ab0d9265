"""Replica counts for the `tape` policy: how many slots each expert gets.

Every expert gets one replica. Each of the S - E spare slots then goes, one at a time, to the
replica with the highest value, the j-th replica (j >= 2) of expert e being worth

    load[e] / (j - 1)                       the per-replica load it splits (DeepSeek EPLB's greedy)
  + node_spread * load[e] * [j <= N]        it can sit in one more node (locality dispatch keeps
                                            that node's tokens inside it)
  + keep_margin * mean GPU load * [j <= previous count]
                                            it already exists (moving it costs a weight copy).

The value falls as j grows, so the greedy picks the best set of spare replicas. With
`node_spread = keep_margin = 0` it is EPLB's `replicate_experts`. No expert gets more replicas
than there are GPUs: the policy keeps an expert's replicas on distinct GPUs.
"""

from __future__ import annotations

import numpy as np

from tape.layout import Layout

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
        node_spread: weight of a replica that adds a node, relative to the load it splits.
        keep_margin: bonus of an existing replica, as a fraction of the layer's mean GPU load.
        previous_counts: [L, E] int64, the replica counts in force, or None.

    Returns:
        [L, E] int64 counts in [1, G], each layer summing to S.
    """
    num_layers, num_experts = load.shape
    spare = layout.num_replicas - num_experts
    counts = np.ones((num_layers, num_experts), dtype=np.int64)
    if spare == 0:
        return counts
    nodes = layout.num_nodes
    limit = min(layout.num_gpus, spare + 1)
    keep_bonus = keep_margin * load.sum(axis=1, keepdims=True) / layout.num_gpus  # [L, 1] tokens
    previous = previous_counts if previous_counts is not None else counts

    # The second replica is each expert's most valuable: an expert outside the `spare` best
    # second replicas gets no spare slot, so only those `spare` experts are candidates.
    second = load * (1.0 + node_spread * (nodes >= 2)) + keep_bonus * (previous >= 2)
    candidates = min(spare, num_experts)
    chosen = np.argpartition(-second, candidates - 1, axis=1)[:, :candidates]
    chosen_load = np.take_along_axis(load, chosen, axis=1)
    chosen_previous = np.take_along_axis(previous, chosen, axis=1)
    chosen_counts = np.ones(chosen.shape, dtype=np.int64)
    value = np.take_along_axis(second, chosen, axis=1)
    rows = np.arange(num_layers)
    bonus = keep_bonus[:, 0]
    for _ in range(spare):
        pick = value.argmax(axis=1)
        following = chosen_counts[rows, pick] + 2  # the index of the replica after this one
        chosen_counts[rows, pick] = following - 1
        expert_load = chosen_load[rows, pick]
        next_value = (expert_load / (following - 1) + node_spread * expert_load * (following <= nodes)
                      + bonus * (following <= chosen_previous[rows, pick]))
        value[rows, pick] = np.where(following > limit, -np.inf, next_value)
    np.put_along_axis(counts, chosen, chosen_counts, axis=1)
    return counts
