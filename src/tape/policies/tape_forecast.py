"""Forecast of the next window's expert loads, for the `tape` policy.

Each window is turned into shares (each layer's loads divided by the layer's total), so that a
busy window (many prefill steps) does not outweigh a quiet one. The forecast is an exponential
moving average of the shares, scaled back to the newest window's totals:

    level <- level + smoothing * (shares of the next window - level),   oldest window first.

Which smoothing is best depends on the trace: where popularity drifts like a random walk and
windows are long (little counting noise), the newest window alone (smoothing 1) predicts the
next best; where windows are short and noisy, averaging several is better. So the forecast
backtests: it runs the average for `CANDIDATES` smoothings from `smoothing_floor` to 1
(geometrically spaced) over the last `MEMORY` windows, scores each by its squared error in
predicting every window from the ones before, and uses the best (the largest smoothing on ties,
so that with one window of history, or none, the forecast is the newest window). The backtest
runs in float32; the forecast it picks is returned in float64.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CANDIDATES", "MEMORY", "forecast_load"]

CANDIDATES = 6
"""Smoothings the backtest tries, from `smoothing_floor` to 1."""
MEMORY = 16
"""Windows the forecast reads at most (the newest and the 15 before it)."""


def _shares(windows: np.ndarray) -> np.ndarray:
    totals = windows.sum(axis=-1, keepdims=True)
    return windows / np.where(totals > 0, totals, 1.0)


def forecast_load(
    weight: np.ndarray, history: np.ndarray | None, smoothing_floor: float
) -> np.ndarray:
    """The forecast load of every expert in the next window (module doc).

    Args:
        weight: [L, E] float64, tokens per expert in the window to balance (the newest).
        history: [W, L, E] float64, the earlier windows, oldest first, or None.
        smoothing_floor: in (0, 1], the smallest smoothing the backtest may choose; 1 makes the
            forecast the newest window.

    Returns:
        [L, E] float64 tokens, each layer summing to `weight`'s total for that layer.
    """
    if history is None or len(history) == 0 or smoothing_floor >= 1.0:
        return np.array(weight, dtype=np.float64)
    windows = np.concatenate([history[-(MEMORY - 1):], weight[None]], axis=0)
    shares = _shares(windows).astype(np.float32)  # [T, L, E]
    smoothings = np.geomspace(smoothing_floor, 1.0, CANDIDATES).astype(np.float32)[:, None, None]
    level = np.repeat(shares[:1], CANDIDATES, axis=0)  # [A, L, E]
    error = np.zeros(CANDIDATES)
    for window in shares[1:]:
        error += ((level - window) ** 2).sum(axis=(1, 2))
        level += smoothings * (window - level)
    best = CANDIDATES - 1 - int(error[::-1].argmin())  # the largest smoothing on ties
    forecast = _shares(level[best].astype(np.float64)) * weight.sum(axis=1, keepdims=True)
    # A layer idle in every window has no shares to spread: it keeps the newest window's zeros.
    return np.where(level[best].sum(axis=1, keepdims=True) > 0, forecast, weight)
