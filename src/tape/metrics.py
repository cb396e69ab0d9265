"""The seed's metrics ("seed metrics"), exact and vectorized over layers, plus GPU balancedness.

Every function but the weight copy's (which reads a placement alone) scores one placement on
one evaluation window, a `PlacedWindow` (built with
`PlacedWindow.checked(placement, weight, layout)` from outside; trusted here): `weight[L, E]`
(float64, tokens routed to each logical expert in the window). Each slot `s` of layer `l`
carries `weight[l, e] / logcnt[l, e]` tokens, `e = phy2log[l, s]`; a GPU carries the sum of its
slots. The window computes those loads once for every metric.

Communication and weight copies are priced per unit (a token, or one expert's weights) by where
the two ends sit: `SAME_GPU_COST` on one GPU, `SAME_NODE_COST` within a node (NVLink),
`CROSS_NODE_COST` across nodes (InfiniBand). Versions 0, 2, 3 and 4 of the seed's evaluator
combine these scores with `combined_score`; `timeline` is its "overall balancedness".

Where a ratio has nothing to measure (an all-zero load: mean / max = 0 / 0) it is 1.0: nothing is
unbalanced. The two exceptions are the seed's own: `communication_score` is 0 when no
communication is exposed and `weight_copy_score` is 1 when nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tape.errors import TapeError
from tape.layout import Layout
from tape.placement import PlacedWindow, Placement

__all__ = [
    "COMMUNICATION_SCORE_SCALE",
    "CROSS_NODE_COST",
    "HIDDEN_COMMUNICATION_FRACTION",
    "SAME_GPU_COST",
    "SAME_NODE_COST",
    "SEED_VERSIONS",
    "SPEED_REFERENCE_SECONDS",
    "Timeline",
    "balancedness_score",
    "combined_score",
    "communication_cost",
    "communication_score",
    "gpu_balancedness",
    "speed_score",
    "timeline",
    "weight_copy_cost",
    "weight_copy_score",
]

SAME_GPU_COST = 0.0
"""Cost of moving one token (or one expert's weights) within a GPU."""
SAME_NODE_COST = 1.0
"""Cost of moving one token (or one expert's weights) to another GPU of the same node."""
CROSS_NODE_COST = 18.0
"""Cost of moving one token (or one expert's weights) to a GPU of another node."""
HIDDEN_COMMUNICATION_FRACTION = 0.1
"""Communication cost up to this fraction of the window's tokens overlaps compute (is free)."""
COMMUNICATION_SCORE_SCALE = 10.0
"""`communication_score` = this * exposed(minimum) / exposed(actual)."""
SPEED_REFERENCE_SECONDS = 0.02
"""`speed_score` = this / mean seconds per `rebalance_experts` call."""

_VERSION_PARTS: dict[int, tuple[str, ...]] = {
    0: ("balancedness", "speed"),
    2: ("balancedness", "communication"),
    3: ("balancedness", "speed", "communication"),
    4: ("balancedness", "speed", "communication", "weight_copy"),
}
SEED_VERSIONS: tuple[int, ...] = tuple(_VERSION_PARTS)
"""The seed evaluator's versions that `combined_score` knows: (0, 2, 3, 4)."""


def _mean_over_max(numerator: float, denominator: float) -> float:
    """`numerator / denominator`, or 1.0 when both are 0 (an all-zero load is balanced)."""
    return 1.0 if denominator == 0 else float(numerator / denominator)


def _layer_balancedness(loads: np.ndarray) -> float:
    """Sum over layers of the mean load / sum over layers of the max, `loads` [L, S] or [L, G]."""
    return _mean_over_max(loads.mean(axis=1).sum(), loads.max(axis=1).sum())


def _gpu_cost_matrix(layout: Layout) -> np.ndarray:
    """[G, G] float64: cost per unit sent from GPU a (row) to GPU b (column)."""
    same_node = layout.gpu_node[:, None] == layout.gpu_node[None, :]
    cost = np.where(same_node, SAME_NODE_COST, CROSS_NODE_COST)
    np.fill_diagonal(cost, SAME_GPU_COST)
    return cost


def _uniform_dispatch_tokens(gpu_loads: np.ndarray) -> np.ndarray:
    """[L, G, G] float64: tokens GPU a sends to GPU b in each layer under uniform dispatch.

    Every GPU holds 1/G of each expert's tokens and sends each of the expert's r replicas an
    equal share, `weight / (G * r)`. Summed over the replicas that GPU b holds, that is
    `gpu_loads[l, b] / G`, whatever the source GPU a: the result is a broadcast view.
    """
    num_layers, num_gpus = gpu_loads.shape
    return np.broadcast_to(gpu_loads[:, None, :] / num_gpus, (num_layers, num_gpus, num_gpus))


def balancedness_score(window: PlacedWindow) -> float:
    """Slot balancedness: sum over layers of the mean slot load / sum over layers of the max.

    Returns:
        A float in (0, 1]; 1.0 for an all-zero load.
    """
    return _layer_balancedness(window.slot_loads)


def gpu_balancedness(window: PlacedWindow) -> float:
    """GPU balancedness: as `balancedness_score`, over GPU loads (the sum of a GPU's slots).

    Returns:
        A float in (0, 1]; 1.0 for an all-zero load.
    """
    return _layer_balancedness(window.gpu_loads)


def communication_cost(window: PlacedWindow) -> tuple[float, float, float]:
    """The seed's dispatch cost under uniform dispatch: `(actual, minimum, total)`.

    Every GPU holds 1/G of each expert's tokens and sends them evenly to all the expert's
    replicas; sending t tokens costs t times `SAME_GPU_COST`, `SAME_NODE_COST` or
    `CROSS_NODE_COST` by where the two GPUs sit.

    Returns:
        actual: cost summed over layers, experts, replicas and source GPUs (token-cost units).
        minimum: for each expert with r replicas and each source GPU,
            `t_per_replica * (min(r, G / N) - 1) * SAME_NODE_COST` with
            `t_per_replica = tokens / (G * r)`, summed (token-cost units).
        total: all tokens of the window, summed over layers and experts.
    """
    layout, weight = window.layout, window.weight
    num_gpus = layout.num_gpus
    tokens = _uniform_dispatch_tokens(window.gpu_loads)
    actual = float(np.einsum("lab,ab->", tokens, _gpu_cost_matrix(layout)))
    replicas = window.placement.logcnt
    tokens_per_replica = weight / (num_gpus * replicas)
    cheapest_per_source = (
        tokens_per_replica * (np.minimum(replicas, layout.gpus_per_node) - 1) * SAME_NODE_COST
    )
    minimum = float(num_gpus * cheapest_per_source.sum())
    return actual, minimum, float(weight.sum())


def communication_score(window: PlacedWindow) -> float:
    """The seed's communication score (versions 2, 3, 4).

    With `exposed(x) = max(x - HIDDEN_COMMUNICATION_FRACTION * total, 0)` over the values of
    `communication_cost`, the score is
    `COMMUNICATION_SCORE_SCALE * exposed(minimum) / exposed(actual)`, and 0 when
    `exposed(actual)` is 0. Under uniform dispatch `actual` does not depend on where replicas
    sit (see docs/seed-metrics.md), so only replica counts move this score.

    Returns:
        A float in [0, COMMUNICATION_SCORE_SCALE].
    """
    actual, minimum, total = communication_cost(window)
    hidden = HIDDEN_COMMUNICATION_FRACTION * total
    exposed_actual = max(actual - hidden, 0.0)
    if exposed_actual == 0:
        return 0.0
    return COMMUNICATION_SCORE_SCALE * max(minimum - hidden, 0.0) / exposed_actual


def weight_copy_cost(placement: Placement, layout: Layout) -> tuple[float, float]:
    """The seed's weight-copy cost (version 4): `(actual, minimum)`, in expert-weight units.

    The first slot of each expert in `log2phy` is its primary; every other replica copies the
    expert's weights from it at `SAME_GPU_COST`, `SAME_NODE_COST` or `CROSS_NODE_COST`. The
    minimum puts up to k - 1 copies on the primary's GPU and the rest in its node. Bytes per
    expert multiply both values alike and cancel in `weight_copy_score`, so they are left out.

    Returns:
        actual: copy cost summed over layers and replicas.
        minimum: the cheapest cost for the same replica counts, summed over layers and experts.
    """
    placement.validate(layout)  # two numbers compared: a placement has no load to check
    slot_gpu = layout.slot_gpu
    primary_of_slot = np.take_along_axis(placement.primary_slots(), placement.phy2log, axis=1)
    copy_costs = _gpu_cost_matrix(layout)[slot_gpu[primary_of_slot], slot_gpu[None, :]]
    is_copy = primary_of_slot != np.arange(placement.num_slots)[None, :]
    actual = float(copy_costs[is_copy].sum())
    copies = placement.logcnt - 1
    on_primary_gpu = np.minimum(copies, layout.slots_per_gpu - 1)
    minimum = float(
        (on_primary_gpu * SAME_GPU_COST + (copies - on_primary_gpu) * SAME_NODE_COST).sum()
    )
    return actual, minimum


def weight_copy_score(placement: Placement, layout: Layout) -> float:
    """The seed's weight-copy score (version 4): `min(minimum / actual, 1)`, 1 if nothing is copied.

    When no expert has more replicas than a GPU has slots, the minimum is 0 and the score is 0
    unless every copy sits on its primary's GPU (see docs/seed-metrics.md).
    """
    actual, minimum = weight_copy_cost(placement, layout)
    if actual == 0:
        return 1.0
    return min(minimum / actual, 1.0)


def speed_score(mean_seconds: float) -> float:
    """The seed's speed score: `SPEED_REFERENCE_SECONDS / mean_seconds`.

    Args:
        mean_seconds: mean wall-clock seconds per `rebalance_experts` call (the policy alone).

    Raises:
        TapeError: `mean_seconds` is not a positive finite number.
    """
    seconds = float(mean_seconds)
    if not np.isfinite(seconds) or seconds <= 0:
        raise TapeError(f"mean_seconds must be a positive finite number, got {mean_seconds!r}")
    return SPEED_REFERENCE_SECONDS / seconds


def combined_score(
    version: int,
    *,
    balancedness: float,
    speed: float | None = None,
    communication: float | None = None,
    weight_copy: float | None = None,
) -> float:
    """The seed's combined score: the mean of the parts that `version` uses.

    v0 = (balancedness + speed) / 2; v2 = (balancedness + communication) / 2;
    v3 = (balancedness + speed + communication) / 3; v4 = all four / 4. Parts that a version does
    not use are ignored.

    Raises:
        TapeError: `version` is not one of `SEED_VERSIONS`, or a part it uses is None.
    """
    if version not in _VERSION_PARTS:
        known = ", ".join(str(known) for known in SEED_VERSIONS)
        raise TapeError(f"unknown TAPE version {version!r}; expected one of {known}")
    given = {
        "balancedness": balancedness,
        "speed": speed,
        "communication": communication,
        "weight_copy": weight_copy,
    }
    needed = _VERSION_PARTS[version]
    missing = [name for name in needed if given[name] is None]
    if missing:
        raise TapeError(
            f"version {version} combines {', '.join(needed)}; missing: {', '.join(missing)}"
        )
    return float(sum(given[name] for name in needed) / len(needed))


@dataclass(frozen=True, eq=False)
class Timeline:
    """The seed's execution timeline, per layer and GPU, and its three summary ratios.

    Attributes:
        compute: [L, G] float64, tokens each GPU computes (the sum of its slots' loads).
        comm: [L, G] float64, communication time in token-cost units: the larger of the GPU's
            largest single send and largest single receive (see `timeline`).
    """

    compute: np.ndarray
    comm: np.ndarray

    @property
    def work(self) -> np.ndarray:
        """[L, G] float64: max(compute, comm), the time each GPU is busy in each layer."""
        return np.maximum(self.compute, self.comm)

    @property
    def overall_balancedness(self) -> float:
        """Mean / max over GPUs of the work summed over layers."""
        per_gpu = self.work.sum(axis=0)
        return _mean_over_max(per_gpu.mean(), per_gpu.max())

    @property
    def compute_balancedness(self) -> float:
        """Mean / max over GPUs of the compute summed over layers."""
        per_gpu = self.compute.sum(axis=0)
        return _mean_over_max(per_gpu.mean(), per_gpu.max())

    @property
    def efficiency(self) -> float:
        """Mean over GPUs of the summed compute / max over GPUs of the summed work."""
        return _mean_over_max(self.compute.sum(axis=0).mean(), self.work.sum(axis=0).max())

    def summary(self) -> dict[str, float]:
        """The three ratios by name: overall_balancedness, compute_balancedness, efficiency."""
        return {
            "overall_balancedness": self.overall_balancedness,
            "compute_balancedness": self.compute_balancedness,
            "efficiency": self.efficiency,
        }


def _max_of_the_others(values: np.ndarray) -> np.ndarray:
    """[..., n] -> [..., n]: at index i, the max of `values[..., j]` over j != i (0 if n == 1).

    `values` must be >= 0 (0 stands for "nothing there"). The largest value's index gets the
    second largest, every other index the largest.
    """
    count = values.shape[-1]
    if count == 1:
        return np.zeros_like(values)
    largest = values.max(axis=-1, keepdims=True)
    second = np.partition(values, count - 2, axis=-1)[..., count - 2 : count - 1]
    at_largest = np.arange(count) == values.argmax(axis=-1)[..., None]
    return np.where(at_largest, second, largest)


def timeline(window: PlacedWindow) -> Timeline:
    """The seed's "overall balancedness" timeline under uniform dispatch.

    Per layer and GPU: compute = the sum of its slots' loads. Every GPU holds 1/G of each
    expert's tokens and sends each replica of the expert an equal share. A *single send* is one
    expert's tokens from one source GPU a to one replica slot on GPU b != a, costing
    `c(a, b) * weight[l, e] / (G * logcnt[l, e])` = `c(a, b) * slot load / G`, with c =
    `SAME_NODE_COST` within a node and `CROSS_NODE_COST` across; sends are not summed over
    experts or replicas. send[a] = the largest single send from a, receive[b] = the largest
    into b (0 where there is none); comm = max(send, receive); work = max(compute, comm).

    Vectorized: with `top[l, g]` the largest slot load on GPU g over G, send[a] is the larger of
    `SAME_NODE_COST` times the largest `top` of a's node's other GPUs and `CROSS_NODE_COST`
    times the largest of the other nodes' GPUs; receive[b] is `top[b]` times the dearest source
    b has (another node if there is one, else another GPU of its node, else none).

    Returns:
        A `Timeline` with compute[L, G] and comm[L, G]; its `overall_balancedness`,
        `compute_balancedness` and `efficiency` are the seed's three numbers.
    """
    layout = window.layout
    compute = window.gpu_loads
    top = window.slot_loads_by_gpu.max(axis=2) / layout.num_gpus  # [L, G]
    by_node = top.reshape(top.shape[0], layout.num_nodes, layout.gpus_per_node)
    in_node = _max_of_the_others(by_node).reshape(top.shape)
    other_nodes = np.repeat(_max_of_the_others(by_node.max(axis=2)), layout.gpus_per_node, axis=1)
    send = np.maximum(SAME_NODE_COST * in_node, CROSS_NODE_COST * other_nodes)
    if layout.num_nodes > 1:
        dearest_source = CROSS_NODE_COST
    elif layout.gpus_per_node > 1:
        dearest_source = SAME_NODE_COST
    else:
        dearest_source = SAME_GPU_COST
    receive = top * dearest_source
    return Timeline(compute=compute, comm=np.maximum(send, receive))
