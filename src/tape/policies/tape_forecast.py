"""Forecast of the next window's expert loads, for the `tape` policy.

Each window is turned into shares (each layer's loads divided by the layer's total), the shares
are smoothed with an exponential moving average (oldest window first, the window to balance
last), and the result is scaled back to the newest window's totals. Shares rather than raw
tokens keep a busy window (many prefill steps) from outweighing a quiet one.

With smoothing 1 the forecast is the newest window itself; lower values average over more of
the history, which steadies the forecast (fewer expert moves from one rebalance to the next)
but follows real shifts in popularity more slowly.
"""

from __future__ import annotations

import numpy as np

__all__ = ["forecast_load"]


def forecast_load(weight: np.ndarray, history: np.ndarray | None, smoothing: float) -> np.ndarray:
    """The forecast load of every expert in the next window.

    Args:
        weight: [L, E] float64, tokens per expert in the window to balance (the newest).
        history: [W, L, E] float64, the earlier windows, oldest first, or None.
        smoothing: in (0, 1], the moving average's weight on the newest window; the window
            w steps older gets `smoothing * (1 - smoothing) ** w`, the oldest the remainder.

    Returns:
        [L, E] float64 tokens, each layer summing to `weight`'s total for that layer (a layer
        with no tokens in any window keeps `weight`'s zeros).
    """
    if history is None or len(history) == 0 or smoothing >= 1.0:
        return np.array(weight, dtype=np.float64)
    windows = np.concatenate([history, weight[None]], axis=0)
    totals = windows.sum(axis=2, keepdims=True)
    shares = windows / np.where(totals > 0, totals, 1.0)
    count = windows.shape[0]
    coefficients = smoothing * (1.0 - smoothing) ** np.arange(count - 1, -1, -1, dtype=np.float64)
    coefficients[0] = (1.0 - smoothing) ** (count - 1)
    smoothed = np.tensordot(coefficients, shares, axes=1)
    # Windows with no tokens in a layer carry no shares: renormalise what the others carry.
    smoothed_total = smoothed.sum(axis=1, keepdims=True)
    scale = weight.sum(axis=1, keepdims=True) / np.where(smoothed_total > 0, smoothed_total, 1.0)
    return np.where(smoothed_total > 0, smoothed * scale, weight)
