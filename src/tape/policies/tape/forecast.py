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
so that with one window of history, or none, the forecast is the newest window).

Every level is a weighted sum of the windows' shares, so every error is a quadratic form in the
windows' Gram matrix (the dot products of their shares, over all layers and experts): the
backtest costs one [T, L * E] x [L * E, T] product, whatever the number of candidates.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CANDIDATES", "MEMORY", "forecast_load", "smoothing_coefficients"]

CANDIDATES = 6
"""Smoothings the backtest tries, from `smoothing_floor` to 1."""
MEMORY = 16
"""Windows the forecast reads at most (the newest and the 15 before it)."""
_TIE = 1e-9
"""Errors within this fraction of the shares' squared norm count as ties."""


def smoothing_coefficients(smoothings: np.ndarray, num_windows: int) -> np.ndarray:
    """[A, T, T] float64 (A smoothings, T windows): `c[a, t, u]`, the weight of window u in
    the level after window t.

    The level after window t, with smoothing s = smoothings[a], is `sum_u c[a, t, u] shares[u]`:
    `(1 - s)^t` for u = 0 (the first window starts the level), `s (1 - s)^(t - u)` for
    0 < u <= t, and 0 for u > t.
    """
    steps = np.arange(num_windows)
    lag = steps[:, None] - steps[None, :]  # [T, T]: t - u
    weights = (1.0 - smoothings)[:, None, None] ** np.maximum(lag, 0)  # [A, T, T]
    weights[:, :, 1:] *= smoothings[:, None, None]
    weights[:, lag < 0] = 0.0
    return weights


def forecast_load(
    weight: np.ndarray, history: np.ndarray | None, smoothing_floor: float
) -> np.ndarray:
    """The forecast load of every expert in the next window (module doc).

    Args:
        weight: [L, E] float64, tokens per expert in the window to balance (the newest).
        history: [W, L, E] float64, the earlier windows, oldest first, or None; only the last
            `MEMORY - 1` are read.
        smoothing_floor: in (0, 1], the smallest smoothing the backtest may choose; 1 makes the
            forecast the newest window.

    Returns:
        [L, E] float64 tokens, each layer summing to `weight`'s total for that layer (`weight`
        itself when the backtest picks smoothing 1).
    """
    if history is None or len(history) == 0 or smoothing_floor >= 1.0:
        return weight
    earlier = history[-(MEMORY - 1):]
    num_windows = len(earlier) + 1
    num_layers, num_experts = weight.shape
    totals = np.empty((num_windows, num_layers, 1))
    totals[:-1, :, 0] = earlier.sum(axis=2)
    totals[-1, :, 0] = weight.sum(axis=1)
    scale = 1.0 / np.where(totals > 0, totals, 1.0)
    shares = np.empty((num_windows, num_layers, num_experts))
    np.multiply(earlier, scale[:-1], out=shares[:-1])
    np.multiply(weight, scale[-1], out=shares[-1])
    shares = shares.reshape(num_windows, -1)  # [T, L * E]
    gram = shares @ shares.T  # [T, T]

    smoothings = smoothing_floor ** np.linspace(1.0, 0.0, CANDIDATES)  # geometric, floor to 1
    coefficients = smoothing_coefficients(smoothings, num_windows)  # [A, T, T]
    # Prediction errors: the level after window t - 1 against window t, for t = 1 .. T - 1.
    miss = coefficients[:, :-1, :] - np.eye(num_windows)[1:]  # [A, T - 1, T]
    error = ((miss @ gram) * miss).sum(axis=(1, 2))
    ties = error <= error.min() + _TIE * np.trace(gram)
    best = int(np.flatnonzero(ties)[-1])  # the largest smoothing on ties
    if best == CANDIDATES - 1:
        return weight
    level = (coefficients[best, -1] @ shares).reshape(num_layers, num_experts)
    level_total = level.sum(axis=1, keepdims=True)
    # A layer idle in every window has no shares to spread: it keeps the newest window's zeros.
    return np.where(level_total > 0, level * (totals[-1] / np.where(level_total > 0, level_total,
                                                                    1.0)), weight)
