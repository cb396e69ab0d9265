"""Benchmark: the baseline policies against DeepSeek EPLB's reference and vLLM's default policy.

DeepSeek-V3 shape (58 layers, 256 experts, 288 slots, 8 groups, 4 nodes, 32 GPUs), realistic
skewed loads: windows of 100 steps of TAPE's synthetic trace (group-limited top-8 routing,
drifting per-layer popularity). Two readings of the reference, and vLLM's default policy,
are timed in the same run as the policies, on the same windows (warm-up, then repeats; mean, sd, min, max in ms per call):

- the numpy loop reading (tests/reference_eplb.py), always;
- the torch reading (tests/reference_eplb_torch.py), the reference's own operations on
  CPU torch tensors, when torch is installed (it is not a TAPE dependency). Its input is a
  torch tensor made before timing, as the reference receives one;
- a numpy reading of vLLM's current default policy (tests/reference_vllm_default.py:
  DeepSeek's algorithm as vLLM writes it in numpy, plus its pass that keeps experts in their
  slots on the same GPU), always, given the map in force (the previous window's placement) as
  vLLM gives it. Where vLLM imports (docs/serving.md installs it beside a CPU torch), its own
  `DefaultEplbPolicy` is timed too, called as vLLM calls it (a CPU int64 load tensor and the
  map in force, made before timing), a row beside the reading it should match in cost
  (tests/engines/ checks that the two place alike).

Each policy's ratio to each reading is printed. `deepseek core` times the policy's
computation alone (the maps as arrays, like the reference returns); `deepseek` adds building
the validated `Placement`; `api` is `tape.api.rebalance_experts`. `min-moves` gets the
previous window's deepseek placement. Then deepseek's placement quality against each
reading's: largest slot load per layer (must be equal), GPU balancedness (mean / max of GPU
loads, summed over layers), and GPUs holding two replicas of one expert. The two readings
may place tied items differently (torch's default sort is not stable), never with another
largest slot load. Target: deepseek >= 50x faster than the reference.

`tape, as served` is the `tape` policy given the placement in force and the earlier windows,
as `tape.Rebalancer` gives them behind an engine.

Run: python benchmarks/bench_policies.py  (about a minute on one core with torch, less
without)
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the references
import reference_eplb
import reference_vllm_default

LAYOUT = Layout(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
ARGS = (LAYOUT.num_replicas, LAYOUT.num_groups, LAYOUT.num_nodes, LAYOUT.num_gpus)
NUM_WINDOWS = 4
STEPS_PER_WINDOW = 100
WARMUP = 2
REPEATS = 5
TORCH_REPEATS = 2  # the torch reading takes about half a second a call
TARGET_RATIO = 50.0
NUMPY_READING = "reference (numpy reading)"
TORCH_READING = "reference (torch reading)"
VLLM_READING = "vLLM default (numpy reading)"
VLLM_ITSELF = "vLLM default (vLLM's own)"
SHORT_NAMES = {NUMPY_READING: "numpy", TORCH_READING: "torch", VLLM_READING: "vLLM"}
SERVING_TAPE = "tape, as served"


def timed(call, num_windows: int, warmup: int = WARMUP, repeats: int = REPEATS) -> list[float]:
    """Milliseconds per call, one sample per repeat (each repeat runs every window)."""
    for _ in range(warmup):
        for index in range(num_windows):
            call(index)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for index in range(num_windows):
            call(index)
        samples.append((time.perf_counter() - start) * 1e3 / num_windows)
    return samples


def torch_reading():
    """The torch reading of the reference (module), or None when torch is not installed."""
    try:
        import reference_eplb_torch
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        return None
    return reference_eplb_torch


def vllm_default_policy():
    """vLLM's default EPLB policy class, or None when vLLM (or torch) does not import."""
    try:
        from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
    except ImportError:
        return None
    return DefaultEplbPolicy


def gpu_balancedness(placement: Placement, weight: np.ndarray) -> float:
    loads = placement.gpu_loads(weight, LAYOUT.num_gpus)
    return float(loads.mean(axis=1).sum() / loads.max(axis=1).sum())


def main() -> None:
    trace = synthetic_trace(num_steps=NUM_WINDOWS * STEPS_PER_WINDOW, seed=0)
    windows = trace.reshape(NUM_WINDOWS, STEPS_PER_WINDOW, *trace.shape[1:]).sum(axis=1)
    deepseek_previous = [place(w, LAYOUT, "deepseek") for w in windows]
    tape_previous = [place(w, LAYOUT, "tape") for w in windows]
    torch_reference = torch_reading()
    vllm_policy = vllm_default_policy()

    calls = {
        NUMPY_READING: lambda i: reference_eplb.rebalance_experts(windows[i], *ARGS),
        VLLM_READING: lambda i: reference_vllm_default.rebalance_experts(
            windows[i], *ARGS, deepseek_previous[i - 1].phy2log),
        "deepseek core": lambda i: hierarchical_placement(windows[i], LAYOUT, 8, 4),
        "api rebalance_experts": lambda i: rebalance_experts(windows[i], *ARGS),
    }
    for name in policy_names():
        policy = get_policy(name)
        if name == "min-moves":
            calls[name] = lambda i, p=policy: p(
                windows[i], LAYOUT, previous=deepseek_previous[i - 1]
            )
        else:
            calls[name] = lambda i, p=policy: p(windows[i], LAYOUT)
    # as tape.Rebalancer calls it behind an engine: the placement in force and earlier windows
    tape = get_policy("tape")
    calls[SERVING_TAPE] = lambda i: tape(windows[i], LAYOUT, previous=tape_previous[i - 1],
                                         history=windows[:i] if i else None)

    print(
        f"DeepSeek-V3 shape, {NUM_WINDOWS} windows of {STEPS_PER_WINDOW} synthetic steps; "
        f"ms per call over {REPEATS} repeats after {WARMUP} warm-ups"
    )
    results = {name: timed(call, NUM_WINDOWS) for name, call in calls.items()}
    readings = [NUMPY_READING, VLLM_READING]
    if torch_reference is None:
        print(
            "torch not installed: pip install torch==2.13.0 to measure against the torch reference"
        )
    else:
        import torch

        torch_windows = [torch.from_numpy(w) for w in windows]
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; the torch reading "
            f"over {TORCH_REPEATS} repeats after 1 warm-up"
        )
        results[TORCH_READING] = timed(
            lambda i: torch_reference.rebalance_experts(torch_windows[i], *ARGS),
            NUM_WINDOWS,
            warmup=1,
            repeats=TORCH_REPEATS,
        )
        readings.append(TORCH_READING)
    if vllm_policy is None:
        print("vLLM not installed: its default policy is timed in the numpy reading only "
              "(docs/serving.md installs vLLM to time its own beside it)")
    else:
        from importlib.metadata import version

        import torch

        vllm_windows = [torch.from_numpy(w.astype(np.int64)) for w in windows]
        in_force = [torch.from_numpy(p.phy2log) for p in deepseek_previous]
        print(f"vLLM {version('vllm')}: its default policy with the map in force, over "
              f"{REPEATS} repeats after {WARMUP} warm-ups")
        results[VLLM_ITSELF] = timed(
            lambda i: vllm_policy.rebalance_experts(vllm_windows[i], *ARGS, in_force[i - 1]),
            NUM_WINDOWS,
        )

    reading_means = [statistics.mean(results[r]) for r in readings]
    reading_mins = [min(results[r]) for r in readings]
    columns = "".join(f"{'x ' + SHORT_NAMES[r] + ' (mean, min)':>22s}" for r in readings)
    print(f"\n{'':28s}{'mean':>9s}{'sd':>8s}{'min':>9s}{'max':>9s}{columns}")
    for name, samples in results.items():
        mean, low = statistics.mean(samples), min(samples)
        ratios = "".join(
            f"{r_mean / mean:13.1f}x{r_min / low:7.1f}x"
            for r_mean, r_min in zip(reading_means, reading_mins)
        )
        print(
            f"{name:28s}{mean:9.3f}{statistics.stdev(samples):8.3f}{low:9.3f}"
            f"{max(samples):9.3f}{ratios}"
        )
    for reading, reading_mean in zip(readings, reading_means):
        if reading == VLLM_READING:  # what an engine user switches from: no target, the ratio
            for name in ("tape", SERVING_TAPE, "deepseek"):
                ratio = reading_mean / statistics.mean(results[name])
                print(f"{name} vs {reading}: {ratio:.1f}x")
            continue
        for name in ("deepseek core", "deepseek"):
            ratio = reading_mean / statistics.mean(results[name])
            verdict = "met" if ratio >= TARGET_RATIO else "not met"
            print(f"{name} vs {reading}: {ratio:.1f}x (target {TARGET_RATIO:.0f}x: {verdict})")

    references = {NUMPY_READING: lambda w: reference_eplb.rebalance_experts(w, *ARGS)}
    if torch_reference is not None:
        references[TORCH_READING] = lambda w: [
            m.numpy() for m in torch_reference.rebalance_experts(torch.from_numpy(w), *ARGS)
        ]
    for reading, reference in references.items():
        print(f"\nQuality, deepseek vs the {reading}, per window (double replicas: a GPU "
              f"holding two replicas of one expert; ours only when an expert has more replicas "
              f"than its node has GPUs, {LAYOUT.gpus_per_node}):")
        print(
            f"{'window':>6s}{'max slot load rel. diff':>26s}{'GPU bal. ours':>15s}"
            f"{'reference':>11s}{'double replicas ours':>22s}{'reference':>11s}"
        )
        for index, weight in enumerate(windows):
            ours = place(weight, LAYOUT, "deepseek")
            theirs = Placement.from_maps(*reference(weight))
            top_ours = ours.slot_loads(weight).max(axis=1)
            top_theirs = theirs.slot_loads(weight).max(axis=1)
            difference = float(np.max(np.abs(top_ours - top_theirs) / top_theirs))
            doubled_ours = int((ours.replicas_per_gpu(LAYOUT.num_gpus) > 1).sum())
            doubled_theirs = int((theirs.replicas_per_gpu(LAYOUT.num_gpus) > 1).sum())
            print(
                f"{index:6d}{difference:26.2e}{gpu_balancedness(ours, weight):15.5f}"
                f"{gpu_balancedness(theirs, weight):11.5f}{doubled_ours:22d}"
                f"{doubled_theirs:11d}"
            )


if __name__ == "__main__":
    main()
