"""The evaluation protocol: rebalance on window i, score on window i + 1, average over pairs.

A run replays a trace's windows through a placement source (a registered policy, or a user's
program in a sandbox) and scores every pair with the seed's metrics and the realistic cost
model. The policy sees only window i (and, for registered policies, the placement it produced at
the previous pair and the windows before i); it never sees window i + 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tape import metrics
from tape.costmodel import migration_metrics, realistic_metrics
from tape.dispatch import fewest_ib_tokens
from tape.errors import ProgramError, TapeError, TraceError
from tape.layout import Layout
from tape.placement import PlacedWindow, Placement
from tape.presets import ClusterSpec, ModelSpec, cluster_preset, model_preset
from tape.trace import check_loads

__all__ = [
    "VERSIONS",
    "ProgramScore",
    "Replay",
    "check_windows",
    "combined_key",
    "parse_version",
    "policy_source",
    "replay",
    "score_policy",
    "score_program",
    "score_replay",
    "window_steps",
]

VERSIONS: tuple[int | str, ...] = (0, 2, 3, 4, "realistic")

# A placement source: (window load [L, E], previous placement or None, earlier windows
# [i, L, E]) -> (placement, seconds the policy itself took).
PlacementSource = Callable[[np.ndarray, "Placement | None", np.ndarray], tuple[Placement, float]]


def window_steps(steps_per_window: int | Sequence[int], index: int) -> int:
    """Forward steps in window `index`: one number for all windows, or one per window."""
    if isinstance(steps_per_window, (int, np.integer)):
        return int(steps_per_window)
    return int(steps_per_window[index])


def combined_key(version: int | str) -> str:
    """The metric name of a version's combined score: `combined_score_v0` .. `_realistic`."""
    return "combined_score_realistic" if version == "realistic" else f"combined_score_v{version}"


def parse_version(value: int | str) -> int | str:
    """`value` as one of VERSIONS ("0" -> 0); TapeError naming the versions otherwise."""
    text = str(value).strip().lower()
    for version in VERSIONS:
        if text == str(version):
            return version
    raise TapeError(f"unknown version {value!r}; expected one of {', '.join(map(str, VERSIONS))}")


def check_windows(windows: np.ndarray, layout: Layout, *, replay: bool = True) -> np.ndarray:
    """Validate windowed loads [W, L, E] against `layout`; return them as float64. With
    `replay` (the protocol), at least 2 windows: rebalance on one, score on the next."""
    windows = check_loads(windows, source="windowed loads", unit="window")
    if replay and windows.shape[0] < 2:
        raise TraceError(
            f"the protocol needs at least 2 windows (rebalance on one, score on the next), got "
            f"{windows.shape[0]}: use a longer trace or a smaller --interval"
        )
    layout.check_experts(windows.shape[2])
    return windows


@dataclass
class Replay:
    """The placements a source produced: `placements[i]` was computed from window i."""

    placements: list[Placement]
    seconds: list[float]


def replay(
    source: PlacementSource,
    windows: np.ndarray,
    *,
    progress: Callable[[], None] | None = None,
) -> Replay:
    """Run `source` on windows 0..W-2, passing each call the placement of the call before."""
    placements: list[Placement] = []
    seconds: list[float] = []
    previous: Placement | None = None
    for index in range(windows.shape[0] - 1):
        placement, elapsed = source(windows[index], previous, windows[:index])
        placements.append(placement)
        seconds.append(elapsed)
        previous = placement
        if progress is not None:
            progress()
    return Replay(placements, seconds)


@dataclass
class ProgramScore:
    """Scores of one run of the protocol.

    Attributes:
        metrics: mean over window pairs of every metric, plus `combined_score` for the version
            and `avg_raw_time` (mean seconds per policy call). JSON-friendly floats.
        per_pair: each metric's value for every pair, in pair order (migration metrics start at
            the second pair: the first placement has nothing to migrate from).
        error: why the program failed (then `combined_score` is 0), else None.
        placements: the placements the source produced (not serialized).
        seconds: each policy call's runtime in seconds.
        isolation: for a program run in the sandbox, the isolation it ran with ("bwrap" or
            "partial", `tape.isolation`); None for a registered policy.
    """

    metrics: dict[str, float]
    per_pair: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None
    placements: list[Placement] = field(default_factory=list, repr=False)
    seconds: list[float] = field(default_factory=list)
    isolation: str | None = None

    @classmethod
    def failed(cls, reason: str, isolation: str | None = None) -> ProgramScore:
        return cls(metrics={"combined_score": 0.0}, error=reason, isolation=isolation)

    def to_json(self) -> dict[str, Any]:
        """One JSON object: the metric names as keys, `per_pair` lists, `error`, and
        `isolation` for a sandboxed program."""
        extra = {} if self.isolation is None else {"isolation": self.isolation}
        return {**self.metrics, "per_pair": self.per_pair, "error": self.error, **extra}


def window_metrics(
    placement: Placement,
    weight: np.ndarray,
    layout: Layout,
    model: ModelSpec,
    cluster: ClusterSpec,
    dispatch: str,
    steps: int,
) -> dict[str, float]:
    """Every per-window score of `placement` on `weight` [L, E] (a window of `steps` forward
    steps): the seed's metrics (balancedness, communication, weight copy, the timeline's three
    ratios) and the realistic model's (balance, traffic, times, `locality_score`, and with
    locality dispatch `ib_tokens_bound`, the fewest inter-node tokens any placement could send).
    The replay (`score_placements`) and `tape place` both score with it."""
    window = PlacedWindow(placement, weight, layout)  # both checked where they entered
    timeline = metrics.timeline(window)
    values = {
        "balancedness_score": metrics.balancedness_score(window),
        "communication_score": metrics.communication_score(window),
        "weight_copy_score": metrics.weight_copy_score(placement, layout),
        "overall_balancedness": timeline.overall_balancedness,
        "compute_balancedness": timeline.compute_balancedness,
        "efficiency": timeline.efficiency,
    }
    for key, value in realistic_metrics(window, model, cluster, dispatch, steps=steps).items():
        values[key] = float(value)
    total = float(weight.sum())
    values["locality_score"] = 1.0 - values["ib_tokens"] / total if total > 0 else 1.0
    if dispatch == "locality":
        values["ib_tokens_bound"] = fewest_ib_tokens(weight, layout)
    return values


def _realistic_score(values: dict[str, float], steps: int, runtime_s: float) -> float:
    """The `realistic` version's score of one pair: the fraction of ideal throughput.

    Ideal: `steps` forward steps with every layer's compute spread evenly over the GPUs and
    free communication. Actual: `steps` steps at the modelled step time (the busiest GPU's
    compute and communication, layer by layer), plus the rebalance's weight migration, plus
    the policy's own runtime. So balance, locality, migration and speed all count, in seconds.
    """
    ideal = steps * values["balanced_compute_time_s"]
    actual = (steps * values["step_time_s"] + values.get("migration_seconds", 0.0)
              + runtime_s)
    return float(ideal / actual) if actual > 0 else 1.0


def score_replay(
    run: Replay,
    windows: np.ndarray,
    layout: Layout,
    *,
    version: int | str = 0,
    model: ModelSpec | None = None,
    cluster: ClusterSpec | None = None,
    dispatch: str = "locality",
    steps_per_window: int | Sequence[int] = 1,
) -> ProgramScore:
    """Score `run`'s placement i on window i + 1 for every pair; average over pairs."""
    version = parse_version(version)
    model = model or model_preset()
    cluster = cluster or cluster_preset()
    per_pair: dict[str, list[float]] = {}
    for index, placement in enumerate(run.placements):
        values = window_metrics(
            placement, windows[index + 1], layout, model, cluster, dispatch,
            window_steps(steps_per_window, index + 1),
        )
        if index > 0:
            moved = migration_metrics(run.placements[index - 1], placement, layout, model, cluster)
            values.update({key: float(value) for key, value in moved.items()})
        values["realistic_score"] = _realistic_score(
            values, window_steps(steps_per_window, index + 1), run.seconds[index]
        )
        for key, value in values.items():
            per_pair.setdefault(key, []).append(value)
    means = {key: float(np.mean(series)) for key, series in per_pair.items()}
    mean_seconds = float(np.mean(run.seconds))
    means["avg_raw_time"] = mean_seconds
    means["speed_score"] = metrics.speed_score(mean_seconds)
    for each in VERSIONS:
        if each == "realistic":
            combined = means.pop("realistic_score")
        else:
            combined = metrics.combined_score(
                each,
                balancedness=means["balancedness_score"],
                speed=means["speed_score"],
                communication=means["communication_score"],
                weight_copy=means["weight_copy_score"],
            )
        means[combined_key(each)] = combined
    means["combined_score"] = means[combined_key(version)]
    per_pair["runtime_s"] = list(run.seconds)
    return ProgramScore(means, per_pair, None, run.placements, list(run.seconds))


def score_program(
    program_path: str | Path,
    windows: np.ndarray,
    layout: Layout,
    *,
    version: int | str = 0,
    timeout_s: float = 60.0,
    memory_mb: int = 4096,
    budget_s: float | None = None,
    isolation: str = "auto",
    model: ModelSpec | None = None,
    cluster: ClusterSpec | None = None,
    dispatch: str = "locality",
    steps_per_window: int | Sequence[int] = 1,
    progress: Callable[[], None] | None = None,
) -> ProgramScore:
    """Run a user's program (a file defining `rebalance_experts`) through the protocol.

    The program runs in a sandboxed child process that sees one window per call
    (`tape.sandbox.SandboxedProgram`: `timeout_s` a call, `budget_s` all calls, `memory_mb`,
    `isolation`), timed from outside it. A program that cannot be loaded, raises, times out,
    runs past its budget or returns a bad placement scores 0 with the reason in `error`; the
    result names the isolation that ran. Bad trace or layout arguments raise `TapeError`, an
    isolation that cannot run `IsolationError`.
    """
    from tape.sandbox import SandboxedProgram

    version = parse_version(version)
    windows = check_windows(windows, layout)
    path = Path(program_path)
    if not path.is_file():
        raise ProgramError(f"program {path} does not exist")
    program = SandboxedProgram(path, timeout_s=timeout_s, memory_mb=memory_mb,
                               budget_s=budget_s, isolation=isolation)
    try:
        with program:

            def source(weight, previous, history):
                return program.call(weight, layout)

            run = replay(source, windows, progress=progress)
        score = score_replay(
            run, windows, layout, version=version, model=model, cluster=cluster,
            dispatch=dispatch, steps_per_window=steps_per_window,
        )
    except TapeError as error:  # the program's failure, never the whole run's
        return ProgramScore.failed(str(error), program.isolation)
    score.isolation = program.isolation
    return score


def policy_source(
    policy: str, layout: Layout, params: dict[str, Any] | None = None, *, timing_repeats: int = 1
) -> PlacementSource:
    """A placement source for a registered policy, timing each call.

    With `timing_repeats` > 1 each call is made that many times and timed by the fastest (the
    policies are deterministic): less noise from the machine in the speed score.
    """
    from tape.api import place

    params = dict(params or {})

    def source(weight, previous, history):
        history = history if len(history) else None
        seconds = []
        for _ in range(max(1, timing_repeats)):
            start = time.perf_counter()
            placement = place(weight, layout, policy=policy, previous=previous, history=history,
                              **params)
            seconds.append(time.perf_counter() - start)
        return placement, min(seconds)

    return source


def score_policy(
    policy: str,
    windows: np.ndarray,
    layout: Layout,
    *,
    version: int | str = 0,
    params: dict[str, Any] | None = None,
    model: ModelSpec | None = None,
    cluster: ClusterSpec | None = None,
    dispatch: str = "locality",
    steps_per_window: int | Sequence[int] = 1,
    progress: Callable[[], None] | None = None,
    timing_repeats: int = 1,
) -> ProgramScore:
    """Run a registered policy through the protocol (with the previous placement passed on);
    `timing_repeats` as in `policy_source`."""
    version = parse_version(version)
    windows = check_windows(windows, layout)
    source = policy_source(policy, layout, params, timing_repeats=timing_repeats)
    source(windows[0], None, windows[:0])  # warm-up: caches, imports, first-call costs
    run = replay(source, windows, progress=progress)
    return score_replay(
        run, windows, layout, version=version, model=model, cluster=cluster,
        dispatch=dispatch, steps_per_window=steps_per_window,
    )
