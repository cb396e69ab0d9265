"""Benchmark: the realistic cost model on a 12-window DeepSeek-V3-shaped trace.

Trace: tape.synthetic's seeded trace, 1,200 steps of 58 layers x 256 experts, cut into 12 windows
of 100 steps. Cluster: 288 slots, 8 groups, 4 nodes, 32 GPUs (h800 preset). Placements: the
`deepseek` policy balanced on windows 0..10. Timed: for each of the 11 pairs, `realistic_metrics`
of placement i on window i + 1 under both dispatch policies, plus `migration_metrics` between
consecutive placements (10 rebalances). Target: the whole scoring well under 1 second.

Then the same quantities on a subset (a few layers of one pair) with the plain-loop readings of
SPEC from the tests, to check agreement and print the speed ratio per layer.

Run: python benchmarks/bench_costmodel.py  (about 10 seconds on one core, mostly the plain loops)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from tape.costmodel import DISPATCH_POLICIES, migration_metrics, realistic_metrics, traffic
from tape.layout import Layout
from tape.placement import PlacedWindow, Placement
from tape.policies import get_policy
from tape.presets import load_config
from tape.synthetic import synthetic_trace

# The plain-loop readings live in the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_costmodel import plain_traffic
from test_migration import plain_migration

NUM_WINDOWS = 12
STEPS_PER_WINDOW = 100
SUBSET_LAYERS = 3
TARGET_SECONDS = 1.0
REPEATS = 3


def windows_and_placements(layout: Layout) -> tuple[np.ndarray, list[Placement]]:
    trace = synthetic_trace(num_steps=NUM_WINDOWS * STEPS_PER_WINDOW, seed=0)
    windows = trace.reshape(NUM_WINDOWS, STEPS_PER_WINDOW, *trace.shape[1:]).sum(axis=1)
    policy = get_policy("deepseek")
    return windows, [policy(windows[i], layout) for i in range(NUM_WINDOWS - 1)]


def score_all(windows, placements, layout, model, cluster) -> list[dict]:
    results = []
    for index, placement in enumerate(placements):
        row = {}
        window = PlacedWindow.checked(placement, windows[index + 1], layout)
        for dispatch in DISPATCH_POLICIES:
            values = realistic_metrics(window, model, cluster, dispatch, steps=STEPS_PER_WINDOW)
            row[dispatch] = values
        if index > 0:
            row["migration"] = migration_metrics(
                placements[index - 1], placement, layout, model, cluster
            )
        results.append(row)
    return results


def subset_ratio(windows, placements, layout, model, cluster) -> None:
    """Plain loops vs vectorized on SUBSET_LAYERS layers of the last pair; check they agree."""
    layers = slice(0, SUBSET_LAYERS)
    previous = Placement(placements[-2].phy2log[layers], placements[-2].num_experts)
    current = Placement(placements[-1].phy2log[layers], placements[-1].num_experts)
    load = windows[-1][layers]
    for dispatch in DISPATCH_POLICIES:
        start = time.perf_counter()
        plain = plain_traffic(current, load, layout, dispatch)
        plain_seconds = time.perf_counter() - start
        start = time.perf_counter()
        flows = traffic(PlacedWindow.checked(current, load, layout), dispatch)
        fast_seconds = time.perf_counter() - start
        np.testing.assert_allclose(flows.ib_sent_tokens, plain["ib_sent"], rtol=1e-9)
        np.testing.assert_allclose(flows.nvlink_received_tokens, plain["nvlink_received"],
                                   rtol=1e-9)
        np.testing.assert_allclose(flows.computed_tokens, plain["computed"], rtol=1e-9)
        print(f"  traffic ({dispatch:8s}) on {SUBSET_LAYERS} layers: plain {plain_seconds:7.3f} s, "
              f"vectorized {fast_seconds * 1e3:6.2f} ms, ratio {plain_seconds / fast_seconds:7.0f}x")
    start = time.perf_counter()
    plain_moves = plain_migration(previous, current, layout, model, cluster)
    plain_seconds = time.perf_counter() - start
    start = time.perf_counter()
    moves = migration_metrics(previous, current, layout, model, cluster)
    fast_seconds = time.perf_counter() - start
    assert moves["ib_copies"] == plain_moves["ib"]
    assert moves["nvlink_copies"] == plain_moves["nvlink"]
    print(f"  migration          on {SUBSET_LAYERS} layers: plain {plain_seconds:7.3f} s, "
          f"vectorized {fast_seconds * 1e3:6.2f} ms, ratio {plain_seconds / fast_seconds:7.0f}x")


def main() -> None:
    layout = Layout()
    model, cluster = load_config()
    windows, placements = windows_and_placements(layout)
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        results = score_all(windows, placements, layout, model, cluster)
        best = min(best, time.perf_counter() - start)
    print(f"{len(placements)} pairs x {len(DISPATCH_POLICIES)} dispatch policies + "
          f"{len(placements) - 1} migrations, DeepSeek-V3 shape, {cluster.name}:")
    print(f"  total {best:.3f} s (best of {REPEATS}); target < {TARGET_SECONDS:.1f} s: "
          f"{'OK' if best < TARGET_SECONDS else 'MISSED'}")
    for dispatch in DISPATCH_POLICIES:
        step = np.mean([row[dispatch]["step_time_s"] for row in results])
        ib = np.mean([row[dispatch]["ib_tokens"] for row in results])
        print(f"  {dispatch:8s}: mean step time {step * 1e3:7.3f} ms, mean IB tokens {ib:,.0f}")
    moved = np.mean([row["migration"]["moved_experts"] for row in results[1:]])
    seconds = np.mean([row["migration"]["migration_seconds"] for row in results[1:]])
    print(f"  migration: mean moved experts {moved:,.0f}, mean seconds {seconds:.3f}")
    subset_ratio(windows, placements, layout, model, cluster)


if __name__ == "__main__":
    main()
