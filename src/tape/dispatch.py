"""Token dispatch: where each expert's tokens are computed, and which links they cross.

Tokens start evenly over all G GPUs: for every layer l and expert e, each GPU holds
`weight[l, e] / G` of the expert's tokens. A dispatch policy decides how each source GPU splits
its share among the expert's replicas:

    uniform   (vLLM: replica `position % count`) every source GPU splits its share evenly over
              all replicas of the expert, wherever they sit.
    locality  (SGLang static) the replicas on the source GPU if it holds any, else the replicas
              on the source's node, else all replicas; evenly among the chosen ones.

A token that stays on its GPU crosses no link; one sent within a node crosses NVLink; one sent
to another node crosses InfiniBand. Counts are token-expert assignments, as in the traces: a
token routed to 8 experts counts 8 times, once per expert (no deduplication of a token sent to
several experts on one GPU or node).

Computation: per source GPU a, expert e and destination class, the policy gives a *density*,
the tokens a sends to each replica of that class:

    own     tokens per replica on GPU a itself,
    node    tokens per replica on the other GPUs of a's node,
    remote  tokens per replica on the GPUs of other nodes.

With `replicas[l, g, e]` (replicas of e on GPU g) and `node_replicas` (replicas of e on g's
node), every sum below is over [L, G, E] arrays: no loop, no [G, G] matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tape.arrays import to_numpy
from tape.errors import ConfigError, TraceError
from tape.layout import Layout
from tape.placement import Placement

__all__ = ["DISPATCH_POLICIES", "Traffic", "check_dispatch", "checked_load", "traffic"]

DISPATCH_POLICIES = ("uniform", "locality")
"""The dispatch policies `traffic` knows."""


@dataclass(frozen=True)
class Traffic:
    """Tokens computed on, and sent and received by, every GPU of every layer.

    All arrays are float64 [L, G], in tokens (token-expert assignments) of the load given to
    `traffic`. "Sent" counts a GPU's own tokens it dispatches to other GPUs' experts;
    "received" counts other GPUs' tokens dispatched to its experts. The results (the combine)
    travel the same links in the opposite direction.

    Attributes:
        dispatch: the dispatch policy, one of DISPATCH_POLICIES.
        computed_tokens: tokens each GPU's experts compute (its own kept ones plus received).
        active_slots: int64 [L, G], slots of each GPU that compute at least one token.
        local_tokens: tokens a GPU keeps for its own experts (cross no link).
        nvlink_sent_tokens: tokens a GPU sends to other GPUs of its node.
        nvlink_received_tokens: tokens a GPU receives from other GPUs of its node.
        ib_sent_tokens: tokens a GPU sends to GPUs of other nodes.
        ib_received_tokens: tokens a GPU receives from GPUs of other nodes.
    """

    dispatch: str
    computed_tokens: np.ndarray
    active_slots: np.ndarray
    local_tokens: np.ndarray
    nvlink_sent_tokens: np.ndarray
    nvlink_received_tokens: np.ndarray
    ib_sent_tokens: np.ndarray
    ib_received_tokens: np.ndarray

    @property
    def num_layers(self) -> int:
        return self.computed_tokens.shape[0]

    @property
    def num_gpus(self) -> int:
        return self.computed_tokens.shape[1]


def check_dispatch(dispatch: str) -> str:
    """Return `dispatch` if it names a policy in DISPATCH_POLICIES; `ConfigError` otherwise."""
    if dispatch not in DISPATCH_POLICIES:
        raise ConfigError(
            f"unknown dispatch policy {dispatch!r}; expected one of {', '.join(DISPATCH_POLICIES)}"
        )
    return dispatch


def checked_load(placement: Placement, weight: Any) -> np.ndarray:
    """`weight` as float64 [L, E] matching `placement`: finite and >= 0; `TraceError` otherwise."""
    array = to_numpy(weight)
    if array.dtype.kind not in "iuf":
        raise TraceError(f"weight must hold numbers, got dtype {array.dtype}")
    expected = (placement.num_layers, placement.num_experts)
    if array.shape != expected:
        raise TraceError(
            f"weight has shape {array.shape}, expected (layers, experts) = {expected} to match "
            "the placement"
        )
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise TraceError("weight holds NaN or infinite values; expected finite token counts")
    if np.any(array < 0):
        raise TraceError(f"weight holds negative values (min {array.min()}); expected >= 0")
    return array


def _node_sums(per_gpu: np.ndarray, layout: Layout) -> np.ndarray:
    """[L, G, E] -> [L, G, E]: for each GPU, the sum over the GPUs of its node."""
    num_layers, _, num_experts = per_gpu.shape
    grouped = per_gpu.reshape(num_layers, layout.num_nodes, layout.gpus_per_node, num_experts)
    return np.repeat(grouped.sum(axis=2), layout.gpus_per_node, axis=1)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray, where: np.ndarray) -> np.ndarray:
    """numerator / denominator where `where`, else 0 (no division by zero is evaluated)."""
    out = np.zeros(np.broadcast_shapes(numerator.shape, denominator.shape, where.shape))
    np.divide(numerator, denominator, out=out, where=where)
    return out


def _densities(
    share: np.ndarray,
    replicas: np.ndarray,
    node_replicas: np.ndarray,
    replica_count: np.ndarray,
    dispatch: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens each source GPU sends to each replica on itself, its node, and other nodes.

    Args:
        share: [L, 1, E] tokens of each expert every GPU starts with.
        replicas: [L, G, E] replicas of each expert on each GPU.
        node_replicas: [L, G, E] replicas of each expert on each GPU's node.
        replica_count: [L, 1, E] replicas of each expert in all.
        dispatch: a name in DISPATCH_POLICIES.

    Returns:
        (own, node, remote), each [L, G, E] float64 tokens per replica.
    """
    if dispatch == "uniform":
        per_replica = np.broadcast_to(share / replica_count, replicas.shape)
        return per_replica, per_replica, per_replica
    has_own = replicas > 0
    node_has = node_replicas > 0
    own = _safe_divide(share, replicas, has_own)
    node = _safe_divide(share, node_replicas, node_has & ~has_own)
    remote = np.where(node_has, 0.0, share / replica_count)
    return own, node, remote


def traffic(placement: Placement, weight: Any, layout: Layout, dispatch: str) -> Traffic:
    """Dispatch `weight`'s tokens to `placement`'s replicas; count tokens per GPU and link.

    Args:
        placement: the placement; must fit `layout`.
        weight: [L, E] tokens (token-expert assignments) per logical expert.
        layout: the cluster: slot s on GPU s // k, GPU g on node g // (G / N).
        dispatch: "uniform" or "locality" (see the module docstring).

    Returns:
        The `Traffic` of every layer and GPU, in the tokens of `weight`.
    """
    placement.validate(layout)
    check_dispatch(dispatch)
    weight = checked_load(placement, weight)
    replicas = placement.replicas_per_gpu(layout.num_gpus).astype(np.float64)
    node_replicas = _node_sums(replicas, layout)
    replica_count = placement.logcnt[:, None, :].astype(np.float64)
    share = weight[:, None, :] / layout.num_gpus
    own, node, remote = _densities(share, replicas, node_replicas, replica_count, dispatch)

    node_sent = node * (node_replicas - replicas)
    remote_sent = remote * (replica_count - node_replicas)
    own_kept = replicas * own
    node_received = replicas * (_node_sums(node, layout) - node)
    remote_received = replicas * (remote.sum(axis=1, keepdims=True) - _node_sums(remote, layout))
    expert_tokens = own_kept + node_received + remote_received
    return Traffic(
        dispatch=dispatch,
        computed_tokens=expert_tokens.sum(axis=2),
        active_slots=np.where(expert_tokens > 0, replicas, 0).sum(axis=2).astype(np.int64),
        local_tokens=own_kept.sum(axis=2),
        nvlink_sent_tokens=node_sent.sum(axis=2),
        nvlink_received_tokens=node_received.sum(axis=2),
        ib_sent_tokens=remote_sent.sum(axis=2),
        ib_received_tokens=remote_received.sum(axis=2),
    )
