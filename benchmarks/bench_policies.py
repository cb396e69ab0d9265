"""Benchmark: the baseline policies against the numpy reading of DeepSeek EPLB's reference.

DeepSeek-V3 shape (58 layers, 256 experts, 288 slots, 8 groups, 4 nodes, 32 GPUs), realistic
skewed loads: windows of 100 steps of TAPE's synthetic trace (group-limited top-8 routing,
drifting per-layer popularity). Each policy and the reference (benchmarks/reference_eplb.py)
are timed in the same run on the same windows (warm-up, then repeats; mean, sd, min, max in
ms per call), with each policy's ratio to the reference. `deepseek core` times the policy's
computation alone (the three maps as arrays, like the reference returns); `deepseek` adds
building the validated `Placement`; `api` is `tape.api.rebalance_experts`. `min-moves` gets
the previous window's deepseek placement. Then deepseek's placement quality against the
reference's: largest slot load, GPU balancedness (mean / max of GPU loads, summed over
layers), and GPUs holding two replicas of one expert. Target: deepseek >= 50x faster.

Run: python benchmarks/bench_policies.py  (well under a minute on one core)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tape.api import place, rebalance_experts
from tape.layout import Layout
from tape.placement import Placement
from tape.policies import get_policy, policy_names
from tape.policies.deepseek import hierarchical_placement
from tape.synthetic import synthetic_trace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_eplb

LAYOUT = Layout(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
NUM_WINDOWS = 4
STEPS_PER_WINDOW = 100
WARMUP = 2
REPEATS = 5
TARGET_RATIO = 50.0


def timed(call, windows) -> list[float]:
    """Milliseconds per call, one sample per repeat (each repeat runs every window)."""
    for _ in range(WARMUP):
        for index in range(len(windows)):
            call(index)
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for index in range(len(windows)):
            call(index)
        samples.append((time.perf_counter() - start) * 1e3 / len(windows))
    return samples


def gpu_balancedness(placement: Placement, weight: np.ndarray) -> float:
    loads = placement.gpu_loads(weight, LAYOUT.num_gpus)
    return float(loads.mean(axis=1).sum() / loads.max(axis=1).sum())


def main() -> None:
    trace = synthetic_trace(num_steps=NUM_WINDOWS * STEPS_PER_WINDOW, seed=0)
    windows = trace.reshape(NUM_WINDOWS, STEPS_PER_WINDOW, *trace.shape[1:]).sum(axis=1)
    args = (LAYOUT.num_replicas, LAYOUT.num_groups, LAYOUT.num_nodes, LAYOUT.num_gpus)
    deepseek_previous = [place(w, LAYOUT, "deepseek") for w in windows]

    calls = {
        "reference (numpy reading)": lambda i: reference_eplb.rebalance_experts(windows[i], *args),
        "deepseek core": lambda i: hierarchical_placement(windows[i], LAYOUT, 8, 4),
        "api rebalance_experts": lambda i: rebalance_experts(windows[i], *args),
    }
    for name in policy_names():
        policy = get_policy(name)
        if name == "min-moves":
            calls[name] = lambda i, p=policy: p(
                windows[i], LAYOUT, previous=deepseek_previous[i - 1]
            )
        else:
            calls[name] = lambda i, p=policy: p(windows[i], LAYOUT)

    print(f"DeepSeek-V3 shape, {NUM_WINDOWS} windows of {STEPS_PER_WINDOW} synthetic steps; "
          f"ms per call over {REPEATS} repeats after {WARMUP} warm-ups\n")
    print(f"{'':28s}{'mean':>9s}{'sd':>8s}{'min':>9s}{'max':>9s}   x reference (mean, min)")
    results = {name: timed(call, windows) for name, call in calls.items()}
    reference_mean = statistics.mean(results["reference (numpy reading)"])
    reference_min = min(results["reference (numpy reading)"])
    for name, samples in results.items():
        mean, low = statistics.mean(samples), min(samples)
        print(f"{name:28s}{mean:9.3f}{statistics.stdev(samples):8.3f}{low:9.3f}"
              f"{max(samples):9.3f}   {reference_mean / mean:7.1f}x {reference_min / low:7.1f}x")
    core = reference_mean / statistics.mean(results["deepseek core"])
    print(f"\ndeepseek core: {core:.1f}x the reference (target {TARGET_RATIO:.0f}x)")

    print("\nQuality, deepseek vs the reference, per window:")
    print(f"{'window':>6s}{'max slot load rel. diff':>26s}{'GPU bal. ours':>15s}"
          f"{'reference':>11s}{'double replicas ours':>22s}{'reference':>11s}")
    for index, weight in enumerate(windows):
        ours = place(weight, LAYOUT, "deepseek")
        theirs = Placement.from_maps(*reference_eplb.rebalance_experts(weight, *args))
        top_ours = ours.slot_loads(weight).max(axis=1)
        top_theirs = theirs.slot_loads(weight).max(axis=1)
        difference = float(np.max(np.abs(top_ours - top_theirs) / top_theirs))
        doubled_ours = int((ours.replicas_per_gpu(LAYOUT.num_gpus) > 1).sum())
        doubled_theirs = int((theirs.replicas_per_gpu(LAYOUT.num_gpus) > 1).sum())
        print(f"{index:6d}{difference:26.2e}{gpu_balancedness(ours, weight):15.5f}"
              f"{gpu_balancedness(theirs, weight):11.5f}{doubled_ours:22d}{doubled_theirs:11d}")


if __name__ == "__main__":
    main()
