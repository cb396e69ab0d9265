"""Benchmark: tape.metrics against the plain-loop readings of SPEC (tests/plainloop.py).

DeepSeek-V3 shape (58 layers, 256 experts, 288 slots, 8 groups, 4 nodes, 32 GPUs), 12 windows of
random skewed loads (numpy; per-layer expert popularity that drifts between windows) and one
random valid placement per window pair (every expert present, extra replicas random, log2phy in
a random order). For each of the 11 pairs it computes balancedness, GPU balancedness,
communication, weight copy and the timeline, with both implementations, checks that they agree
and prints the speed ratio (both run on all 11 pairs; the vectorized time is the best of a few
repeats, the plain loop runs once). Target: tape.metrics >= 100x faster.

Run: python benchmarks/bench_metrics.py  (about 10 seconds on one core)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from tape import metrics
from tape.layout import Layout
from tape.placement import PlacedWindow, Placement

# The plain-loop reference lives beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import plainloop

NUM_LAYERS = 58
NUM_EXPERTS = 256
NUM_WINDOWS = 12
TOKENS_PER_WINDOW = 100 * 512 * 8  # 100 steps of 512 tokens, top-8 routing
TARGET_RATIO = 100.0


def skewed_windows(rng: np.random.Generator) -> np.ndarray:
    """[W, L, E] float64: token counts whose per-layer expert popularity drifts between windows."""
    log_popularity = rng.normal(0.0, 1.2, (NUM_LAYERS, NUM_EXPERTS))
    windows = []
    for _ in range(NUM_WINDOWS):
        log_popularity = log_popularity + rng.normal(0.0, 0.3, log_popularity.shape)
        share = np.exp(log_popularity)
        share /= share.sum(axis=1, keepdims=True)
        windows.append(rng.poisson(TOKENS_PER_WINDOW * share).astype(np.float64))
    return np.stack(windows)


def random_placement(rng: np.random.Generator, layout: Layout) -> Placement:
    """Every expert in every layer, the extra slots random, each expert's replicas in random order."""
    extra = layout.num_replicas - NUM_EXPERTS
    phy2log = np.concatenate(
        [
            np.broadcast_to(np.arange(NUM_EXPERTS), (NUM_LAYERS, NUM_EXPERTS)),
            rng.integers(0, NUM_EXPERTS, (NUM_LAYERS, extra)),
        ],
        axis=1,
    )
    phy2log = rng.permuted(phy2log, axis=1)
    slot_order = Placement(phy2log, NUM_EXPERTS)
    keys = np.where(slot_order.log2phy >= 0, rng.random(slot_order.log2phy.shape), np.inf)
    log2phy = np.take_along_axis(slot_order.log2phy, np.argsort(keys, axis=2), axis=2)
    return Placement.from_maps(phy2log, log2phy, slot_order.logcnt)


def all_metrics(module, placement: Placement, weight: np.ndarray, layout: Layout) -> list[float]:
    """The five metric families of one window pair, as a flat list of floats."""
    if module is metrics:  # one checked window, read by every metric
        window = PlacedWindow.checked(placement, weight, layout)
        summary = metrics.timeline(window).summary()
        scores = [metrics.balancedness_score(window), metrics.gpu_balancedness(window),
                  *metrics.communication_cost(window), metrics.communication_score(window)]
    else:  # the plain loops take the placement, the load and the layout
        summary = module.timeline(placement, weight, layout)
        scores = [module.balancedness_score(placement, weight),
                  module.gpu_balancedness(placement, weight, layout),
                  *module.communication_cost(placement, weight, layout),
                  module.communication_score(placement, weight, layout)]
    return [
        *scores,
        *module.weight_copy_cost(placement, layout),
        module.weight_copy_score(placement, layout),
        summary["overall_balancedness"],
        summary["compute_balancedness"],
        summary["efficiency"],
    ]


def main(vectorized_repeats: int = 5) -> float:
    """Time both implementations, check they agree, print and return the speed ratio."""
    rng = np.random.default_rng(2024)
    layout = Layout(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
    windows = skewed_windows(rng)
    pairs = [(random_placement(rng, layout), windows[i + 1]) for i in range(NUM_WINDOWS - 1)]

    vectorized_seconds = np.inf
    for _ in range(vectorized_repeats):
        start = time.perf_counter()
        vectorized = [all_metrics(metrics, p, w, layout) for p, w in pairs]
        vectorized_seconds = min(vectorized_seconds, time.perf_counter() - start)

    start = time.perf_counter()
    reference = [all_metrics(plainloop, p, w, layout) for p, w in pairs]
    plain_seconds = time.perf_counter() - start

    worst = max(
        float(np.max(np.abs(np.subtract(v, r)) / np.maximum(np.abs(r), 1e-300)))
        for v, r in zip(vectorized, reference)
    )
    ratio = plain_seconds / vectorized_seconds
    print(f"{len(pairs)} window pairs, L={NUM_LAYERS}, E={NUM_EXPERTS}, {layout}")
    print(f"tape.metrics      : {vectorized_seconds * 1e3:9.1f} ms (best of {vectorized_repeats})")
    print(f"plain loop        : {plain_seconds * 1e3:9.1f} ms (tests/plainloop.py, once)")
    print(f"largest relative difference between the two: {worst:.1e}")
    print(f"speed-up          : {ratio:9.0f}x (target >= {TARGET_RATIO:.0f}x)")
    if worst > 1e-9:
        raise SystemExit("tape.metrics and the plain loop disagree beyond 1e-9")
    return ratio


if __name__ == "__main__":
    main()
