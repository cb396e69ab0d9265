"""The realistic cost model: bytes over each link, layer and step times, rebalance costs.

For one placement and one evaluation window (`weight[L, E]`, the tokens of `steps` forward
steps summed), `traffic` (tape.dispatch) says where tokens are computed and which links they
cross. This module turns that into:

- bytes per GPU and link: a token sent to an expert's GPU carries `dispatch_bytes_per_token`
  (FP8 values and scales), its result comes back the opposite way with
  `combine_bytes_per_token` (BF16);
- times per forward step, per layer and GPU (the window's tokens divided by `steps`):
    compute  = tokens * flops_per_token / flops + active slots * bytes_per_expert / memory_bandwidth
    dispatch = max over links (NVLink, InfiniBand) of max(bytes sent, bytes received) / bandwidth
    combine  = the same for the results (the directions swap, so only the bytes per token change)
    busy     = dispatch + compute + combine (phases in sequence; no overlap)
    layer    = max over GPUs of busy;  idle = layer - busy;  step = sum over layers of layer.
  A layer's timeline on a GPU is: dispatch, compute, combine, then idle until the slowest GPU
  ends; layer l starts at `start[l]`, the sum of the earlier layers' times.

`realistic_metrics` and `migration_metrics` give flat, JSON-friendly summaries: tokens and bytes
are totals over the evaluation window, times are per forward step. See docs/cost-model.md for the
assumptions, their limits, and where the hardware figures come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tape import metrics
from tape.dispatch import DISPATCH_POLICIES, Traffic, traffic
from tape.errors import TraceError
from tape.layout import Layout
from tape.migration import Migration, migration
from tape.placement import PlacedWindow, Placement
from tape.presets import ClusterSpec, ModelSpec

__all__ = [
    "DISPATCH_POLICIES",
    "LayerTimes",
    "LinkBytes",
    "Migration",
    "Traffic",
    "layer_times",
    "link_bytes",
    "migration",
    "migration_metrics",
    "realistic_metrics",
    "traffic",
]


@dataclass(frozen=True)
class LinkBytes:
    """Bytes each GPU sends and receives over each link, dispatch and combine together.

    All arrays are float64 [L, G], in bytes, for the tokens of the `Traffic` they come from.

    Attributes:
        nvlink_sent: dispatched tokens to its node's GPUs, plus results returned to them.
        nvlink_received: tokens dispatched to it from its node, plus results coming back.
        ib_sent: as `nvlink_sent`, to and from GPUs of other nodes.
        ib_received: as `nvlink_received`, to and from GPUs of other nodes.
    """

    nvlink_sent: np.ndarray
    nvlink_received: np.ndarray
    ib_sent: np.ndarray
    ib_received: np.ndarray


def link_bytes(flows: Traffic, model: ModelSpec) -> LinkBytes:
    """The bytes of `flows` over NVLink and InfiniBand, per layer and GPU.

    A GPU sends `dispatch_bytes_per_token` for each token it dispatches and
    `combine_bytes_per_token` for each result it returns (one per token it received).
    """
    dispatch, combine = model.dispatch_bytes_per_token, model.combine_bytes_per_token
    nvlink_sent, nvlink_received = flows.nvlink_sent_tokens, flows.nvlink_received_tokens
    ib_sent, ib_received = flows.ib_sent_tokens, flows.ib_received_tokens
    return LinkBytes(
        nvlink_sent=nvlink_sent * dispatch + nvlink_received * combine,
        nvlink_received=nvlink_received * dispatch + nvlink_sent * combine,
        ib_sent=ib_sent * dispatch + ib_received * combine,
        ib_received=ib_received * dispatch + ib_sent * combine,
    )


@dataclass(frozen=True)
class LayerTimes:
    """Seconds per forward step of each phase, per layer and GPU: the step's timeline.

    Attributes:
        compute: float64 [L, G], the experts' GEMMs (FLOPs plus weight reads).
        dispatch: float64 [L, G], sending and receiving tokens.
        combine: float64 [L, G], sending and receiving results.
        layer: float64 [L], the layer's time: the busiest GPU's dispatch + compute + combine.
        idle: float64 [L, G], how long each GPU waits for the busiest one.
        start: float64 [L], when each layer starts within the step.
    """

    compute: np.ndarray
    dispatch: np.ndarray
    combine: np.ndarray
    layer: np.ndarray
    idle: np.ndarray
    start: np.ndarray

    @property
    def comm(self) -> np.ndarray:
        """float64 [L, G]: dispatch + combine."""
        return self.dispatch + self.combine

    @property
    def busy(self) -> np.ndarray:
        """float64 [L, G]: dispatch + compute + combine."""
        return self.dispatch + self.compute + self.combine

    @property
    def step_time(self) -> float:
        """Seconds of one forward step through all MoE layers."""
        return float(self.layer.sum())


def _checked_steps(steps: float) -> float:
    if isinstance(steps, bool) or not isinstance(steps, (int, float, np.integer, np.floating)):
        raise TraceError(f"steps must be a number of forward steps, got {steps!r}")
    if not math.isfinite(steps) or steps <= 0:
        raise TraceError(f"steps must be positive (forward steps in the window), got {steps!r}")
    return float(steps)


def _link_seconds(
    sent: np.ndarray, received: np.ndarray, bandwidth: float, bytes_per_token: float
) -> np.ndarray:
    """[L, G] seconds to send and receive (at once, full duplex) tokens over one link."""
    return np.maximum(sent, received) * (bytes_per_token / bandwidth)


def layer_times(
    flows: Traffic, model: ModelSpec, cluster: ClusterSpec, steps: float = 1
) -> LayerTimes:
    """Per-step times of every layer and GPU for the window `flows` describes.

    Args:
        flows: the window's traffic (tokens of `steps` forward steps).
        model: bytes per token, FLOPs per token and bytes per expert.
        cluster: bandwidths and FLOP/s per GPU.
        steps: forward steps in the window; token counts are divided by it. A slot with a token
            anywhere in the window counts as active in the mean step (an upper bound).

    Returns:
        The `LayerTimes` of the mean forward step.
    """
    steps = _checked_steps(steps)
    compute = flows.computed_tokens * (model.flops_per_token / cluster.flops / steps)
    compute = compute + flows.active_slots * (model.bytes_per_expert / cluster.memory_bandwidth)

    def phase(bytes_per_token: float) -> np.ndarray:
        nvlink = _link_seconds(
            flows.nvlink_sent_tokens,
            flows.nvlink_received_tokens,
            cluster.nvlink_bandwidth,
            bytes_per_token,
        )
        ib = _link_seconds(
            flows.ib_sent_tokens, flows.ib_received_tokens, cluster.ib_bandwidth, bytes_per_token
        )
        return np.maximum(nvlink, ib) / steps

    dispatch = phase(model.dispatch_bytes_per_token)
    combine = phase(model.combine_bytes_per_token)
    busy = dispatch + compute + combine
    layer = busy.max(axis=1)
    return LayerTimes(
        compute=compute,
        dispatch=dispatch,
        combine=combine,
        layer=layer,
        idle=layer[:, None] - busy,
        start=np.cumsum(layer) - layer,
    )


def realistic_metrics(
    window: PlacedWindow,
    model: ModelSpec,
    cluster: ClusterSpec,
    dispatch: str,
    steps: float = 1,
) -> dict[str, float]:
    """The realistic model's summary of one placement on one evaluation window.

    Args:
        window: the placement on the window's load `weight[L, E]` (token-expert assignments
            per expert, summed over the window's steps).
        model, cluster: the model and hardware (see tape.presets).
        dispatch: "uniform" or "locality".
        steps: forward steps summed in the window (times are per step).

    Returns:
        A flat dict of floats:
        gpu_balancedness: sum over layers of the mean GPU load / sum of the max (slot loads
            `weight / logcnt`, as the SPEC defines it; does not depend on `dispatch`);
        local_tokens, nvlink_tokens, ib_tokens: window tokens kept on their GPU, sent within a
            node, sent across nodes;
        nvlink_bytes, ib_bytes: window bytes over each link, dispatch and combine;
        step_time_s: seconds per forward step (sum over layers of the busiest GPU's time);
        compute_time_s, comm_time_s: the busiest GPU's compute and communication, summed over
            layers (they add up to step_time_s);
        time_balancedness: mean over GPUs of busy time / step time (1 = no GPU ever waits);
        balanced_compute_time_s: seconds per step if every layer's compute were spread evenly
            over the GPUs and communication were free (sum over layers of the mean GPU's
            compute): the lower bound that step_time_s is compared with.
    """
    flows = traffic(window, dispatch)
    times = layer_times(flows, model, cluster, steps)
    sent = link_bytes(flows, model)
    critical = times.busy.argmax(axis=1)[:, None]
    critical_compute = np.take_along_axis(times.compute, critical, axis=1).sum()
    step_time = times.step_time
    mean_busy = times.busy.sum(axis=0).mean()
    return {
        "gpu_balancedness": metrics.gpu_balancedness(window),
        "local_tokens": float(flows.local_tokens.sum()),
        "nvlink_tokens": float(flows.nvlink_sent_tokens.sum()),
        "ib_tokens": float(flows.ib_sent_tokens.sum()),
        "nvlink_bytes": float(sent.nvlink_sent.sum()),
        "ib_bytes": float(sent.ib_sent.sum()),
        "step_time_s": step_time,
        "balanced_compute_time_s": float(times.compute.mean(axis=1).sum()),
        "compute_time_s": float(critical_compute),
        "comm_time_s": step_time - float(critical_compute),
        "time_balancedness": float(mean_busy / step_time) if step_time > 0 else 1.0,
    }


def migration_metrics(
    previous: Placement,
    current: Placement,
    layout: Layout,
    model: ModelSpec,
    cluster: ClusterSpec,
) -> dict[str, int | float]:
    """The realistic model's summary of one rebalance, from `previous` to `current`.

    Returns:
        A flat dict, summed over layers and GPUs: changed_slots, local_copies, nvlink_copies,
        ib_copies, moved_experts (= nvlink + ib copies) as ints; migration_nvlink_bytes,
        migration_ib_bytes (bytes received over each link) and migration_seconds (the busiest
        receiving GPU's time, see tape.migration) as floats.
    """
    moves = migration(previous, current, layout, model, cluster)
    return {
        "changed_slots": int(moves.changed_slots.sum()),
        "local_copies": int(moves.local_copies.sum()),
        "nvlink_copies": int(moves.nvlink_copies.sum()),
        "ib_copies": int(moves.ib_copies.sum()),
        "moved_experts": int(moves.moved_experts.sum()),
        "migration_nvlink_bytes": float(moves.nvlink_bytes.sum()),
        "migration_ib_bytes": float(moves.ib_bytes.sum()),
        "migration_seconds": moves.seconds,
    }
