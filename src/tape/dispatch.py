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

Computation, with s = weight[l, e] / G (a source GPU's share), c[g, e] the replicas of e on GPU
g, r[e] all replicas of e, h[n, e] the GPUs of node n holding e, m[n, e] the replicas on node n,
q[e] the nodes holding e, and P = G / N GPUs a node. Every sum over experts is a batched
matrix-vector product over layers: no loop, no [G, G] matrix.

    uniform   each source sends s * c[g, e] / r[e] to GPU g. So a GPU keeps sum_e c s / r,
              sends (m - c) s / r over NVLink and (r - m) s / r over InfiniBand; it receives
              (P - 1) c s / r over NVLink and (G - P) c s / r over InfiniBand.
    locality  a source keeps s if it holds e; else sends s over NVLink if its node holds e;
              else s over InfiniBand. Received, on a GPU holding e (so in a node holding e):
              from the P - h[n, e] GPUs of its node that do not hold e, c / m[n, e] of their s
              each (NVLink); from the P (N - q[e]) GPUs of nodes without e, c / r of their s
              each (InfiniBand).

Under both policies every replica of an expert with tokens gets some: a GPU holding the expert
sends it a share of its own s. So a slot computes tokens exactly when its expert has load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tape.errors import ConfigError
from tape.layout import Layout
from tape.placement import PlacedWindow

__all__ = [
    "DISPATCH_POLICIES", "Traffic", "check_dispatch", "fewest_ib_tokens", "traffic",
]

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


def check_dispatch(dispatch: str) -> str:
    """Return `dispatch` if it names a policy in DISPATCH_POLICIES; `ConfigError` otherwise."""
    if dispatch not in DISPATCH_POLICIES:
        raise ConfigError(
            f"unknown dispatch policy {dispatch!r}; expected one of {', '.join(DISPATCH_POLICIES)}"
        )
    return dispatch


def _per_gpu(per_expert_on_gpu: np.ndarray, per_expert: np.ndarray) -> np.ndarray:
    """sum_e per_expert_on_gpu[l, g, e] * per_expert[l, e]: [L, G, E] x [L, E] -> [L, G]."""
    return np.matmul(per_expert_on_gpu, per_expert[:, :, None])[:, :, 0]


def _uniform(
    share: np.ndarray, replicas: np.ndarray, node_replicas: np.ndarray, layout: Layout,
    replica_count: np.ndarray,
) -> dict[str, np.ndarray]:
    """Uniform dispatch (module docstring): the `Traffic` token arrays by name, each [L, G].

    Args:
        share: [L, E] tokens of each expert every GPU starts with (s).
        replicas: [L, G, E] float64 replicas of each expert on each GPU (c).
        node_replicas: [L, N, E] float64 replicas of each expert on each node (m).
        layout: the cluster.
        replica_count: [L, E] replicas of each expert (r).
    """
    per_replica = share / replica_count
    kept = _per_gpu(replicas, per_replica)
    within_node = np.repeat(_per_gpu(node_replicas, per_replica), layout.gpus_per_node, axis=1)
    return {
        "local_tokens": kept,
        "nvlink_sent_tokens": within_node - kept,
        "ib_sent_tokens": share.sum(axis=1, keepdims=True) - within_node,
        "nvlink_received_tokens": (layout.gpus_per_node - 1) * kept,
        "ib_received_tokens": (layout.num_gpus - layout.gpus_per_node) * kept,
    }


def _locality(
    share: np.ndarray, replicas: np.ndarray, node_replicas: np.ndarray, layout: Layout,
    replica_count: np.ndarray,
) -> dict[str, np.ndarray]:
    """Locality dispatch (module docstring): as `_uniform`, same arguments."""
    num_layers, num_gpus, num_experts = replicas.shape
    by_node = (num_layers, layout.num_nodes, layout.gpus_per_node, num_experts)
    holds = np.minimum(replicas, 1.0)  # 1.0 where the GPU holds the expert, else 0.0
    node_holds = node_replicas > 0
    kept = _per_gpu(holds, share)
    # A source's tokens for experts its node holds, kept or sent over NVLink (a GPU that holds
    # the expert is in a node that holds it); the rest cross InfiniBand.
    within_node = np.repeat(_per_gpu(node_holds.astype(np.float64), share),
                            layout.gpus_per_node, axis=1)
    gpus_holding = holds.reshape(by_node).sum(axis=2)
    from_node = np.zeros(node_replicas.shape)
    np.divide(share[:, None, :] * (layout.gpus_per_node - gpus_holding), node_replicas,
              out=from_node, where=node_holds)
    nodes_without = layout.num_nodes - node_holds.sum(axis=1)
    from_remote = share * (layout.gpus_per_node * nodes_without) / replica_count
    node_received = np.matmul(replicas.reshape(by_node), from_node[:, :, :, None])
    return {
        "local_tokens": kept,
        "nvlink_sent_tokens": within_node - kept,
        "ib_sent_tokens": share.sum(axis=1, keepdims=True) - within_node,
        "nvlink_received_tokens": node_received.reshape(num_layers, num_gpus),
        "ib_received_tokens": _per_gpu(replicas, from_remote),
    }


def traffic(window: PlacedWindow, dispatch: str) -> Traffic:
    """Dispatch the window's tokens to its placement's replicas; count tokens per GPU and link.

    Args:
        window: the placement on the window's load `weight[L, E]` (token-expert assignments
            per logical expert); slot s on GPU s // k, GPU g on node g // (G / N).
        dispatch: "uniform" or "locality" (see the module docstring).

    Returns:
        The `Traffic` of every layer and GPU, in the tokens of `weight`.
    """
    check_dispatch(dispatch)
    placement, weight, layout = window.placement, window.weight, window.layout
    num_layers, num_experts = weight.shape
    replicas = window.replicas_per_gpu
    node_replicas = replicas.reshape(
        num_layers, layout.num_nodes, layout.gpus_per_node, num_experts
    ).sum(axis=2)
    flows = (_uniform if dispatch == "uniform" else _locality)(
        weight / layout.num_gpus, replicas, node_replicas, layout, placement.logcnt
    )
    computed = (
        flows["local_tokens"] + flows["nvlink_received_tokens"] + flows["ib_received_tokens"]
    )
    active = _per_gpu(replicas, (weight > 0).astype(np.float64))
    return Traffic(
        dispatch=dispatch,
        computed_tokens=computed,
        active_slots=np.rint(active).astype(np.int64),
        **flows,
    )


def fewest_ib_tokens(weight: Any, layout: Layout) -> float:
    """The fewest tokens any placement on `layout` sends across nodes under locality dispatch.

    An expert e in n_e of the N nodes sends `w_e (N - n_e) / N` of its tokens across nodes (the
    sources on the nodes without it). Every expert needs one slot, so the S - E spare slots can
    add at most S - E nodes in all, at most N - 1 to an expert: the fewest inter-node tokens
    spend them on the largest `w_e / N`, whatever the slots per node allow (a lower bound, which
    knows `weight`). Under uniform dispatch every placement sends `w_e (N - 1) / N`.

    Args:
        weight: [L, E] tokens (token-expert assignments) per logical expert.
        layout: the cluster; S >= E.

    Returns:
        Inter-node tokens summed over layers, in the tokens of `weight`.
    """
    weight = np.asarray(weight, dtype=np.float64)
    num_nodes = layout.num_nodes
    largest_first = -np.sort(-weight, axis=1)
    # The spare slots go N - 1 at a time to the largest loads, the rest to the next one.
    spare = max(layout.num_replicas - weight.shape[1], 0)
    added = np.clip(spare - np.arange(weight.shape[1]) * (num_nodes - 1), 0, num_nodes - 1)
    # A sum of terms >= 0 (not all tokens less the saved ones): exactly 0 when every loaded
    # expert can sit in every node, where a subtraction left 4e-16 to divide by.
    return float((largest_first * (num_nodes - 1 - added)).sum() / num_nodes)
