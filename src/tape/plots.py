"""Figures: normalized GPU-load heatmaps, box plots, per-layer timelines and the policies'
comparison over window pairs (matplotlib).

Every function writes one PNG atomically and returns its path; nothing is shown on screen.
Figures are `matplotlib.figure.Figure` objects, not pyplot's: no GUI backend is needed, and the
caller's pyplot backend and open figures are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tape.files import atomic_output

__all__ = [
    "COMPARISON_PANELS",
    "normalize_rows",
    "plot_boxplot",
    "plot_comparison",
    "plot_heatmap",
    "plot_timeline",
    "shared_share_range",
]

# Annotate heatmap cells with their value only when there are few enough to read.
_ANNOTATE_MAX_CELLS = 600


def _figure(width: float, height: float, rows: int = 1) -> tuple[Any, Any]:
    """A new figure of `width` x `height` inches and its axes (matplotlib imported here): one
    axes, or with `rows` > 1 an array of `rows` axes stacked over a shared x axis."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    return figure, figure.subplots(rows, 1, sharex=True)


def normalize_rows(gpu_loads: np.ndarray) -> np.ndarray:
    """[L, G] loads scaled so that each layer sums to 1 (an all-zero layer stays 0)."""
    gpu_loads = np.asarray(gpu_loads, dtype=np.float64)
    sums = gpu_loads.sum(axis=1, keepdims=True)
    return np.divide(gpu_loads, sums, out=np.zeros_like(gpu_loads), where=sums > 0)


def _save(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    with atomic_output(Path(path)) as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    return Path(path)


def shared_share_range(loads: Sequence[np.ndarray]) -> tuple[float, float]:
    """The smallest and largest per-layer share (`normalize_rows`) of any of `loads` ([L, G]
    each): one colour scale or y axis for every policy's figure, so that the figures compare."""
    shares = [normalize_rows(gpu_loads) for gpu_loads in loads]
    return (min((float(share.min()) for share in shares), default=0.0),
            max((float(share.max()) for share in shares), default=0.0))


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))


def _node_boundaries(axes: Any, gpus: int, gpus_per_node: int | None) -> None:
    """Vertical lines between nodes (GPUs at x = 0 .. gpus - 1) and "node n" over each node."""
    if not gpus_per_node or gpus_per_node >= gpus:
        return
    for boundary in range(gpus_per_node, gpus, gpus_per_node):
        axes.axvline(boundary - 0.5, color="black", linewidth=1.0, gid="node boundary")
    top = axes.secondary_xaxis("top")
    top.set_xticks([node * gpus_per_node + (gpus_per_node - 1) / 2
                    for node in range(gpus // gpus_per_node)],
                   [f"node {node}" for node in range(gpus // gpus_per_node)], fontsize=8)
    top.tick_params(length=0)


def plot_heatmap(gpu_loads: np.ndarray, path: Path, title: str, *, vmax: float | None = None,
                 gpus_per_node: int | None = None) -> Path:
    """Heatmap of per-layer normalized GPU loads [L, G] (layers down, GPUs across): each
    layer's share of its load on every GPU, white at the ideal 1/G, red above, blue below.

    `vmax`: the top of the colour scale (default: this heatmap's largest share); give every
    policy's heatmap the same one (the highest of `shared_share_range`) to compare them.
    `gpus_per_node`: draw lines between nodes.
    """
    from matplotlib.colors import TwoSlopeNorm

    normalized = normalize_rows(gpu_loads)
    layers, gpus = normalized.shape
    ideal = 1.0 / gpus
    top = max(float(normalized.max()) if vmax is None else vmax, 1.01 * ideal)
    norm = TwoSlopeNorm(vcenter=ideal, vmin=0.0, vmax=top)
    figure, axes = _figure(max(6.0, 0.35 * gpus + 2), max(4.0, 0.16 * layers + 2))
    image = axes.imshow(normalized, aspect="auto", cmap="RdBu_r", norm=norm,
                        interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, label=f"share of the layer's load "
                               f"(ideal 1/G = {ideal:.4g})")
    colorbar.ax.axhline(ideal, color="black", linewidth=1)
    if layers * gpus <= _ANNOTATE_MAX_CELLS:
        shades = norm(normalized)
        for layer in range(layers):
            for gpu in range(gpus):
                dark = abs(shades[layer, gpu] - 0.5) > 0.3
                axes.text(gpu, layer, f"{normalized[layer, gpu]:.2f}", ha="center",
                          va="center", fontsize=6, color="white" if dark else "black")
    _integer_ticks(axes.xaxis)
    _integer_ticks(axes.yaxis)
    _node_boundaries(axes, gpus, gpus_per_node)
    axes.set_xlabel("GPU")
    axes.set_ylabel("layer")
    axes.set_title(title, wrap=True)
    return _save(figure, path)


def plot_boxplot(gpu_loads: np.ndarray, path: Path, title: str, *,
                 value_range: tuple[float, float] | None = None,
                 gpus_per_node: int | None = None) -> Path:
    """Box plot per GPU of the normalized loads across layers, the ideal 1/G line and the
    overall standard deviation.

    `value_range`: (lowest, highest) share the y axis shows (default: this plot's own); give
    every policy's box plot the same one (`shared_share_range`) to compare them. Room is left
    above it for the legend. `gpus_per_node`: draw lines between nodes.
    """
    normalized = normalize_rows(gpu_loads)
    gpus = normalized.shape[1]
    low, high = ((float(normalized.min()), float(normalized.max())) if value_range is None
                 else value_range)
    span = max(high - low, 1e-3 / gpus)
    figure, axes = _figure(max(6.0, 0.3 * gpus + 2), 4.5)
    axes.boxplot(normalized, positions=np.arange(gpus))
    axes.axhline(1.0 / gpus, color="tab:blue", linewidth=1, label=f"ideal 1/G = {1 / gpus:.4g}")
    overall_std = float(normalized.std())
    axes.annotate(
        f"std over all layers and GPUs: {overall_std:.4f}", xy=(0.98, 0.97),
        xycoords="axes fraction", ha="right", va="top", fontsize=9, color="tab:blue",
        bbox={"boxstyle": "round,pad=0.3", "edgecolor": "gray", "facecolor": "white"},
    )
    axes.set_ylim(low - 0.05 * span, high + 0.25 * span)  # the legend sits above the data
    axes.set_xticks(np.arange(gpus))
    axes.set_xticklabels([str(g) for g in range(gpus)], fontsize=7)
    _node_boundaries(axes, gpus, gpus_per_node)
    axes.set_xlabel("GPU")
    axes.set_ylabel("share of the layer's load")
    axes.set_title(title, wrap=True)
    axes.legend(loc="upper left", fontsize=8)
    return _save(figure, path)


def plot_timeline(compute: np.ndarray, comm: np.ndarray, path: Path, title: str, *,
                  longest_layer: float | None = None) -> Path:
    """Per-layer timeline [L, G] in seconds per step: for every layer the mean GPU's compute,
    communication and idle time at the layer's barrier (stacked, they reach the layer time),
    and the layer time, the slowest GPU's compute + communication, whose sum over the layers
    (the step time) the legend gives.

    `longest_layer`: the largest layer time (seconds) the y axis shows (default: this plot's
    own); give every policy's timeline the same one to compare them.
    """
    compute = np.asarray(compute, dtype=np.float64)
    comm = np.asarray(comm, dtype=np.float64)
    busy = compute + comm
    layer_time = busy.max(axis=1)
    idle = layer_time[:, None] - busy
    layers = np.arange(compute.shape[0])
    scale = 1e6  # microseconds
    figure, axes = _figure(max(8.0, 0.18 * len(layers) + 3), 4.5)
    axes.bar(layers, compute.mean(axis=1) * scale, label="compute (mean GPU)", color="tab:green")
    axes.bar(layers, comm.mean(axis=1) * scale, bottom=compute.mean(axis=1) * scale,
             label="communication (mean GPU)", color="tab:orange")
    axes.bar(layers, idle.mean(axis=1) * scale, bottom=busy.mean(axis=1) * scale,
             label="idle at barrier (mean GPU)", color="lightgray")
    axes.plot(layers, layer_time * scale, color="black", marker=".", linewidth=1,
              label=f"layer time (slowest GPU); sum = step time = {layer_time.sum() * 1e3:.4g} ms")
    top = float(layer_time.max(initial=0.0)) if longest_layer is None else longest_layer
    axes.set_ylim(0.0, max(top, 1e-9) * scale * 1.3)  # the legend sits above the bars
    axes.set_xlim(-0.6, len(layers) - 0.4)
    _integer_ticks(axes.xaxis)
    axes.set_xlabel("layer")
    axes.set_ylabel("time per step (µs)")
    axes.set_title(title, wrap=True)
    axes.legend(loc="upper left", fontsize=8, ncols=2)
    return _save(figure, path)


# Panels of the comparison figure, top to bottom: (per-pair metric, y label, scale, what an
# empty panel says, whether it counts things: counts are written 15k, 40M, not 1.5e4, 4e7).
COMPARISON_PANELS = (
    ("gpu_balancedness", "GPU balancedness", 1.0, "no values", False),
    ("moved_experts", "moved experts\nper rebalance", 1.0,
     "no values: migration is scored from the second pair on", True),
    ("ib_tokens", "inter-node (IB)\ntokens per window", 1.0, "no values", True),
    ("step_time_s", "step time (ms)", 1e3, "no values", False),
)

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")


def _policy_colors(count: int) -> list[Any]:
    """`count` distinct colours: tab10 up to 10, tab20 up to 20, then evenly along viridis."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](index) for index in range(count)]
    if count <= 20:
        return [colormaps["tab20"](index) for index in range(count)]
    return list(colormaps["viridis"](np.linspace(0.0, 1.0, count)))


def _wrapped(label: str, width: int = 30) -> str:
    """`label` over several lines of about `width` characters, broken after ':' and ','
    ("tape:preset=balance-migration:migration_weight=0.02" in two lines)."""
    lines = [""]
    for piece in re.split(r"(?<=[:,])", label):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(lines)


def plot_comparison(
    series: Mapping[str, Mapping[str, Sequence[float | None]]], path: Path, title: str
) -> Path:
    """The policies over window pairs: one panel per metric of COMPARISON_PANELS, stacked over
    a shared x axis (pair i: placed on window i, scored on window i + 1), one line with
    markers per policy in the same colour and marker in every panel, one legend.

    `series[policy][metric]` holds one value per pair, None where the pair has none (migration
    before the second pair); a missing metric has no value at any pair.
    """
    from matplotlib.ticker import EngFormatter, MaxNLocator

    pairs = max([1, *(len(values) for metrics in series.values() for values in metrics.values())])
    figure, panels = _figure(min(16.0, max(9.0, 0.08 * pairs + 6)), 2.2 * len(COMPARISON_PANELS),
                             rows=len(COMPARISON_PANELS))
    colors = _policy_colors(len(series))
    marker_size = 6.0 if pairs <= 20 else 4.0 if pairs <= 50 else 2.5
    x = np.arange(pairs)
    for axes, (metric, label, scale, empty_note, counts) in zip(panels, COMPARISON_PANELS,
                                                                strict=True):
        drawn = False
        for index, (policy, metrics) in enumerate(series.items()):
            values = np.full(pairs, np.nan)
            known = metrics.get(metric, ())
            for pair, value in enumerate(known):
                if value is not None:
                    values[pair] = float(value) * scale
            drawn = drawn or bool(np.isfinite(values).any())
            axes.plot(x, values, color=colors[index], marker=_MARKERS[index % len(_MARKERS)],
                      markersize=marker_size, linewidth=1.2, label=_wrapped(policy))
        if not drawn:
            axes.text(0.5, 0.5, empty_note, transform=axes.transAxes, ha="center", va="center",
                      fontsize=9, color="gray")
            axes.set_yticks([])
        elif counts:
            axes.yaxis.set_major_formatter(EngFormatter(sep=""))
        axes.set_ylabel(label, fontsize=9)
        axes.grid(True, alpha=0.3)
    panels[-1].set_xlim(-0.5, pairs - 0.5)
    panels[-1].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    panels[-1].set_xlabel("window pair (placed on window i, scored on window i + 1)")
    panels[0].set_title(title)
    if series:
        panels[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                         title="policy", title_fontsize=8)
    return _save(figure, path)
