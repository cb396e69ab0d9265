"""Figures: normalized GPU-load heatmaps, box plots and per-layer timelines (matplotlib).

Every function writes one PNG atomically and returns its path; nothing is shown on screen.
Figures are `matplotlib.figure.Figure` objects, not pyplot's: no GUI backend is needed, and the
caller's pyplot backend and open figures are left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tape.files import atomic_output

__all__ = ["normalize_rows", "plot_boxplot", "plot_heatmap", "plot_timeline"]

# Annotate heatmap cells with their value only when there are few enough to read.
_ANNOTATE_MAX_CELLS = 600


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A new figure of `width` x `height` inches and its one axes (matplotlib imported here)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


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


def plot_heatmap(gpu_loads: np.ndarray, path: Path, title: str) -> Path:
    """Heatmap of per-layer normalized GPU loads [L, G] (layers down, GPUs across)."""
    normalized = normalize_rows(gpu_loads)
    layers, gpus = normalized.shape
    figure, axes = _figure(max(6.0, 0.35 * gpus + 2), max(4.0, 0.16 * layers + 2))
    image = axes.imshow(normalized, aspect="auto", cmap="Reds", interpolation="nearest")
    figure.colorbar(image, ax=axes, label="normalized load")
    if layers * gpus <= _ANNOTATE_MAX_CELLS:
        for layer in range(layers):
            for gpu in range(gpus):
                axes.text(gpu, layer, f"{normalized[layer, gpu]:.2f}", ha="center",
                          va="center", fontsize=6)
    axes.set_xlabel("GPU")
    axes.set_ylabel("layer")
    axes.set_title(title)
    return _save(figure, path)


def plot_boxplot(gpu_loads: np.ndarray, path: Path, title: str) -> Path:
    """Box plot per GPU of the normalized loads across layers, the ideal 1/G line and the
    overall standard deviation."""
    normalized = normalize_rows(gpu_loads)
    gpus = normalized.shape[1]
    figure, axes = _figure(max(6.0, 0.3 * gpus + 2), 4.5)
    axes.boxplot(normalized, positions=np.arange(gpus))
    axes.axhline(1.0 / gpus, color="tab:blue", linewidth=1, label=f"ideal 1/G = {1 / gpus:.4f}")
    overall_std = float(normalized.std())
    axes.annotate(
        f"overall std: {overall_std:.4f}", xy=(0.98, 0.97), xycoords="axes fraction",
        ha="right", va="top", fontsize=9, color="tab:blue",
        bbox={"boxstyle": "round,pad=0.3", "edgecolor": "gray", "facecolor": "white"},
    )
    axes.set_xticks(np.arange(gpus))
    axes.set_xticklabels([str(g) for g in range(gpus)], fontsize=7)
    axes.set_xlabel("GPU")
    axes.set_ylabel("normalized load")
    axes.set_title(title)
    axes.legend(loc="upper left", fontsize=8)
    return _save(figure, path)


def plot_timeline(compute: np.ndarray, comm: np.ndarray, path: Path, title: str) -> Path:
    """Per-layer timeline [L, G] in seconds: for every layer the busiest GPU's compute and
    communication, the mean GPU's, and the idle time the mean GPU waits at the layer's barrier.

    Layer time is the slowest GPU's compute + communication; the others idle until it finishes.
    """
    compute = np.asarray(compute, dtype=np.float64)
    comm = np.asarray(comm, dtype=np.float64)
    busy = compute + comm
    layer_time = busy.max(axis=1)
    idle = layer_time[:, None] - busy
    layers = np.arange(compute.shape[0])
    scale = 1e6  # microseconds
    figure, axes = _figure(max(7.0, 0.18 * len(layers) + 3), 4.5)
    axes.bar(layers, compute.mean(axis=1) * scale, label="compute (mean GPU)", color="tab:green")
    axes.bar(layers, comm.mean(axis=1) * scale, bottom=compute.mean(axis=1) * scale,
             label="communication (mean GPU)", color="tab:orange")
    axes.bar(layers, idle.mean(axis=1) * scale, bottom=busy.mean(axis=1) * scale,
             label="idle at barrier (mean GPU)", color="lightgray")
    axes.plot(layers, layer_time * scale, color="black", marker=".", linewidth=1,
              label="layer time (slowest GPU)")
    axes.set_xlabel("layer")
    axes.set_ylabel("time per step (µs)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _save(figure, path)
