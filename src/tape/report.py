"""Comparing policies under the protocol, and writing the comparison's files.

`compare_policies` scores each registered policy on the same windows; `write_comparison` writes
into the output folder it is given, with a manifest: per policy, a GPU-load CSV, heatmap, box
plot and timeline (the policies' heatmaps share one colour scale, their box plots one y axis and
their timelines one y axis, so that they compare); over all policies, `comparison_per_window.csv` (one row per policy and window
pair: GPU balancedness, moved experts, inter-node tokens, step time, policy seconds; empty where
a pair has no value), `comparison.png` (those metrics pair by pair, one line per policy) and
`comparison.json` (every mean, ratio and per-pair list).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tape.files import write_json_atomic, write_records_csv, write_table_csv
from tape.layout import Layout
from tape.placement import PlacedWindow
from tape.policies import parse_policy_spec
from tape.presets import ClusterSpec, ModelSpec
from tape.protocol import ProgramScore, score_policy, window_steps

__all__ = [
    "PER_WINDOW_METRICS",
    "RELATIVE_METRICS",
    "compare_policies",
    "evaluated_gpu_loads",
    "pair_series",
    "runtime_stats",
    "summarize",
    "write_comparison",
]


def compare_policies(
    policies: Sequence[str],
    windows: np.ndarray,
    layout: Layout,
    *,
    version: int | str,
    model: ModelSpec,
    cluster: ClusterSpec,
    dispatch: str,
    steps_per_window: int | Sequence[int] = 1,
    progress: Callable[[], None] | None = None,
) -> dict[str, ProgramScore]:
    """Score every policy in `policies` on `windows` (same windows, same layout, same run).

    Each entry is a policy name or a spec with parameters (`tape.policies.parse_policy_spec`,
    for example "tape:fast"); the result is keyed by the entries as given.
    """
    results = {}
    for spec in policies:
        name, params = parse_policy_spec(spec)
        results[spec] = score_policy(
            name, windows, layout, version=version, params=params or None, model=model,
            cluster=cluster, dispatch=dispatch, steps_per_window=steps_per_window,
            progress=progress,
        )
    return results


def runtime_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation, min and max of a policy's call times, in milliseconds."""
    milliseconds = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "runtime_mean_ms": float(milliseconds.mean()),
        "runtime_std_ms": float(milliseconds.std(ddof=1)) if len(milliseconds) > 1 else 0.0,
        "runtime_min_ms": float(milliseconds.min()),
        "runtime_max_ms": float(milliseconds.max()),
    }


# Metrics compared with a baseline policy: (metric, relative key, "difference" or "ratio").
RELATIVE_METRICS = (
    ("gpu_balancedness", "gpu_balancedness_gain", "difference"),
    ("moved_experts", "moved_experts_ratio", "ratio"),
    ("ib_tokens", "ib_tokens_ratio", "ratio"),
    ("step_time_s", "step_time_ratio", "ratio"),
    ("runtime_mean_ms", "runtime_ratio", "ratio"),
)


def summarize(results: dict[str, ProgramScore], baseline: str = "deepseek"
              ) -> dict[str, dict[str, Any]]:
    """Each policy's mean metrics, runtime statistics and error; its inter-node tokens over the
    fewest any placement could send (`ib_tokens_over_bound`, under locality dispatch); when
    `baseline` was run, also each policy's gain over it (GPU balancedness) and ratios to it
    (moves, inter-node tokens, step time, runtime), under the names of RELATIVE_METRICS."""
    summary = {
        # A failed run may have no timings: then no runtime statistics.
        name: {**score.metrics, **(runtime_stats(score.seconds) if score.seconds else {}),
               "error": score.error}
        for name, score in results.items()
    }
    for values in summary.values():
        if values.get("ib_tokens_bound", 0) > 0 and "ib_tokens" in values:
            values["ib_tokens_over_bound"] = values["ib_tokens"] / values["ib_tokens_bound"]
    reference = summary.get(baseline)
    if reference is None or reference["error"]:
        return summary
    for values in summary.values():
        for metric, key, kind in RELATIVE_METRICS:
            if metric not in values or metric not in reference:
                continue
            if kind == "difference":
                values[key] = values[metric] - reference[metric]
            elif reference[metric] > 0:
                values[key] = values[metric] / reference[metric]
    return summary


# Per-pair metrics of comparison_per_window.csv, in column order.
PER_WINDOW_METRICS = ("gpu_balancedness", "moved_experts", "ib_tokens", "step_time_s",
                      "runtime_s")


def pair_series(score: ProgramScore, metrics: Sequence[str]) -> dict[str, list[float | None]]:
    """Each of `metrics` at every pair of `score`'s run, None where a pair has no value.

    A per-pair list shorter than the run's pairs covers its last pairs (migration metrics start
    at the second pair); a metric absent from `per_pair` has no value at any pair.
    """
    pairs = max((len(values) for values in score.per_pair.values()), default=0)
    series: dict[str, list[float | None]] = {}
    for metric in metrics:
        values = score.per_pair.get(metric, [])
        series[metric] = [None] * (pairs - len(values)) + [float(value) for value in values]
    return series


def evaluated_gpu_loads(score: ProgramScore, windows: np.ndarray, layout: Layout) -> np.ndarray:
    """[L, G] GPU loads of each pair's placement on its evaluation window, summed over pairs."""
    return sum(
        placement.gpu_loads(windows[index + 1], layout.num_gpus)
        for index, placement in enumerate(score.placements)
    )


def write_comparison(
    out: Path,
    results: dict[str, ProgramScore],
    windows: np.ndarray,
    layout: Layout,
    *,
    model: ModelSpec,
    cluster: ClusterSpec,
    dispatch: str,
    steps_per_window: int | Sequence[int],
    manifest: dict[str, Any],
) -> list[Path]:
    """Write the comparison's CSVs, plots and JSON into `out`; return the paths written."""
    from tape.costmodel import layer_times, traffic
    from tape.plots import (
        plot_boxplot,
        plot_comparison,
        plot_heatmap,
        plot_timeline,
        shared_share_range,
    )

    written: list[Path] = []
    columns = [f"GPU{gpu}" for gpu in range(layout.num_gpus)]
    stems = _file_stems(list(results))
    # A failed run has no placements: its error is in comparison.json, and it has no files.
    placed = {name: score for name, score in results.items() if score.error is None}
    loads = {name: evaluated_gpu_loads(score, windows, layout) for name, score in placed.items()}
    # Each policy's time per step with its last pair's placement, on the window it is scored on.
    last = {name: len(score.placements) - 1 for name, score in placed.items()}
    times = {name: layer_times(
        traffic(PlacedWindow(score.placements[last[name]], windows[last[name] + 1], layout),
                dispatch),
        model, cluster, steps=window_steps(steps_per_window, last[name] + 1),
    ) for name, score in placed.items()}
    # One scale for all policies, so that their figures compare.
    shares = shared_share_range(list(loads.values()))
    longest_layer = max((float(value.layer.max()) for value in times.values()), default=0.0)
    for name in placed:
        stem = stems[name]
        csv_path = out / f"{stem}_gpu_loads.csv"
        write_table_csv(csv_path, loads[name], columns, "layer")
        written.append(csv_path)
        written.append(plot_heatmap(
            loads[name], out / f"{stem}_gpu_loads_heatmap.png",
            f"{name}: normalized GPU loads per layer (summed over the window pairs)",
            vmax=shares[1], gpus_per_node=layout.gpus_per_node,
        ))
        written.append(plot_boxplot(
            loads[name], out / f"{stem}_gpu_loads_boxplot.png",
            f"{name}: GPU load distribution across layers (summed over the window pairs)",
            value_range=shares, gpus_per_node=layout.gpus_per_node,
        ))
        written.append(plot_timeline(
            times[name].compute, times[name].comm, out / f"{stem}_timeline.png",
            f"{name}: per-layer timeline on window {last[name] + 1} (the last pair's, placed "
            f"on window {last[name]}); {dispatch} dispatch, {cluster.name}",
            longest_layer=longest_layer,
        ))
    series = {name: pair_series(score, PER_WINDOW_METRICS) for name, score in placed.items()}
    table_path = out / "comparison_per_window.csv"
    write_records_csv(table_path, ["policy", "pair", *PER_WINDOW_METRICS], [
        [name, pair, *(values[metric][pair] for metric in PER_WINDOW_METRICS)]
        for name, values in series.items()
        for pair in range(len(values[PER_WINDOW_METRICS[0]]))
    ])
    written.append(table_path)
    failed = [name for name in results if name not in placed]
    written.append(plot_comparison(
        series, out / "comparison.png", "policies window pair by window pair"
        + (f" (failed, not shown: {', '.join(failed)})" if failed else ""),
    ))
    summary = {
        name: {**values, "per_pair": results[name].per_pair}
        for name, values in summarize(results).items()
    }
    json_path = out / "comparison.json"
    write_json_atomic(json_path, summary)
    written.append(json_path)
    manifest_path = out / "manifest.json"
    write_json_atomic(manifest_path, {**manifest, "files": [p.name for p in written]})
    written.append(manifest_path)
    return written


_LONGEST_STEM = 120
"""Longest file-name stem of a policy's files (the longest suffix adds about 25 characters)."""


def _file_stems(names: list[str]) -> dict[str, str]:
    """A file-name stem per policy label: characters other than letters, digits, '.', '-' and
    '_' become '_' ("tape:fast" -> "tape_fast"); a stem longer than _LONGEST_STEM is cut and
    ends in a hash of the label; a stem taken already gets "_2", "_3", ..."""
    stems: dict[str, str] = {}
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        if len(stem) > _LONGEST_STEM:  # file names have a length limit (255 bytes)
            digest = hashlib.sha1(name.encode()).hexdigest()[:10]
            stem = f"{stem[:_LONGEST_STEM - 11]}_{digest}"
        candidate, number = stem, 2
        while candidate in stems.values():
            candidate, number = f"{stem}_{number}", number + 1
        stems[name] = candidate
    return stems
