"""Replica counts for the `tape` policy: how many slots each expert gets.

Every expert gets one replica. Each of the S - E spare slots then goes, one at a time, to the
replica with the highest value, the j-th replica (j >= 2) of expert e being worth

    load[e] / (j - 1)                       the per-replica load it splits (DeepSeek EPLB's greedy)
  + node_spread * load[e] / N * [j <= N]    it can sit in one more node: locality dispatch then
                                            keeps that node's tokens, load[e] / N, inside it
  + keep_margin * mean GPU load * [j <= previous count]
                                            it already exists (moving it costs a weight copy).

The value falls as j grows, so the greedy picks the `S - E` most valuable replicas of all, and
it runs as one selection per layer: the j-th replicas of every expert side by side, the best
`S - E` taken at once. With `node_spread = keep_margin = 0` it is EPLB's `replicate_experts`.
No expert gets more replicas than there are GPUs: the policy keeps an expert's replicas on
distinct GPUs.
"""

from __future__ import annotations

import numpy as np

from tape.layout import Layout

__all__ = ["replica_counts"]


def _largest(values: np.ndarray, count: int) -> np.ndarray:
    """[L, M] bool (M = the rows' width): the `count` largest values of each row, ties to
    the lowest index.

    Ties so broken are EPLB's: its greedy takes the lowest expert among equally loaded ones.
    """
    width = values.shape[1]
    cut = np.partition(values, width - count, axis=1)[:, width - count, None]  # [L, 1]
    chosen = values >= cut
    if np.count_nonzero(chosen) == chosen.shape[0] * count:  # no ties at the cut
        return chosen
    tied = values == cut
    wanted = count - np.count_nonzero(values > cut, axis=1)[:, None]  # ties to take, >= 1
    return (values > cut) | (tied & (np.cumsum(tied, axis=1) <= wanted))


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
    num_layers, num_experts = load.shape
    spare = layout.num_replicas - num_experts
    counts = np.ones(num_layers * num_experts, dtype=np.int64)
    if spare == 0:
        return counts.reshape(num_layers, num_experts)
    nodes = layout.num_nodes
    limit = min(layout.num_gpus, spare + 1)
    keep = previous_counts is not None and keep_margin > 0
    keep_bonus = keep_margin / layout.num_gpus * load.sum(axis=1)  # [L] tokens

    # The second replica is each expert's most valuable: an expert outside the `spare` best
    # second replicas gets no spare slot, so only those `spare` experts are candidates.
    spread = node_spread / nodes if nodes >= 2 else 0.0  # per token of load, for j <= N
    second = load * (1.0 + spread)
    if keep:
        second += np.where(previous_counts >= 2, keep_bonus[:, None], 0.0)
    candidates = min(spare, num_experts)
    chosen = np.flatnonzero(_largest(second, candidates))  # [L * C] flat, by layer
    chosen_load = load.reshape(-1)[chosen].reshape(num_layers, candidates)
    # The `spare` chosen second replicas are all worth at least their layer's worst one, so a
    # replica worth less is never taken; beyond max(N, previous count) the j-th replica is
    # worth load / (j - 1), which bounds the replicas worth looking at.
    widest = limit
    threshold = second.reshape(-1)[chosen].reshape(num_layers, candidates).min(axis=1)  # [L]
    if candidates == spare and threshold.min() > 0:
        by_load = int((chosen_load.max(axis=1) / threshold).max()) + 1
        by_count = int(previous_counts.max()) if keep else 1
        widest = min(limit, max(nodes, by_count, by_load))
    replica = np.arange(2, widest + 1)  # [J]: the j of each column
    worth = 1.0 / (replica - 1) + spread * (replica <= nodes)  # [J] per token of load
    # Rows: the C = `candidates` chosen experts of every layer; columns: replicas 2..J + 1.
    value = chosen_load.reshape(-1, 1) * worth  # [L * C, J]
    if keep:
        existing = replica <= previous_counts.reshape(-1)[chosen][:, None]  # [L * C, J]
        value += np.where(existing, np.repeat(keep_bonus, candidates)[:, None], 0.0)
    taken = np.flatnonzero(_largest(value.reshape(num_layers, -1), spare)) // len(replica)
    counts[chosen] += np.bincount(taken, minlength=len(chosen))
    return counts.reshape(num_layers, num_experts)
