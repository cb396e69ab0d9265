"""Benchmark: the `tape` policy against `deepseek` on every shape people serve.

A matrix of models and clusters (`SHAPES`), each on TAPE's calibrated synthetic trace in the
model's shape (`tape.synthetic.model_trace`), with 100-step and 1,000-step windows. Under the
protocol (rebalance on window i with the previous placement and the earlier windows, score on
window i + 1, locality dispatch, the shape's model and cluster presets), for `tape`'s default
preset against `deepseek` in the same run, it checks on every shape:

- next-window GPU balancedness >= deepseek's - 0.005, as the mean over window pairs and on the
  first pair alone (no previous placement: the cold start);
- moved experts per rebalance <= 10% of deepseek's;
- inter-node tokens (locality dispatch) <= deepseek's;
- modelled step time <= deepseek's, and realistic score >= deepseek's;
- runtime per call <= 20 ms and <= 1/50 of DeepSeek's reference (the torch reading,
  tests/reference_eplb_torch.py, when torch is installed; else the numpy loop reading),
  timed on the same windows (each call the fastest of 3).

Seeds: the benchmark's traces use seed 1000 + the shape's index (100-step windows) and 2000 +
index (1,000-step windows); `tape`'s rule was derived on other seeds (docs/tape-policy.md).

`--extended` adds ten shapes (`EXTENDED`) that the policy was never tuned on, checked alike.

Run: python benchmarks/bench_shapes.py [--shape N ...] [--extended] [--interval 100|1000 ...]
[--preset P] [--param NAME=VALUE ...] [--no-reference] (several minutes for the whole matrix).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import tape.policies.tape  # noqa: F401  (registers "tape")
from tape.layout import Layout
from tape.presets import cluster_preset, model_preset
from tape.protocol import score_policy
from tape.synthetic import model_trace
from tape.trace import window_loads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tape_policy import TIMING_REPEATS, parameter, readings, reference_seconds

BALANCE_SLACK = 0.005
MOVED_RATIO = 0.10
RUNTIME_S = 0.020
SPEEDUP = 50.0
STEPS = {100: 1200, 1000: 3000}  # trace steps for each window size: 11 and 2 window pairs


@dataclass(frozen=True)
class Shape:
    name: str
    model: str
    cluster: str
    num_gpus: int
    num_replicas: int | None = None  # None: the default, G * (ceil(E / G) + 1)

    def layout(self) -> Layout:
        model = model_preset(self.model)
        gpus_per_node = cluster_preset(self.cluster).gpus_per_node
        nodes = max(1, self.num_gpus // gpus_per_node)
        return Layout.for_model(model, self.num_gpus, nodes, self.num_replicas)


SHAPES = [
    Shape("DeepSeek-V3, 32 GPUs / 4 nodes", "deepseek-v3", "h800", 32),
    Shape("DeepSeek-V3, 64 GPUs / 8 nodes", "deepseek-v3", "h800", 64),
    Shape("DeepSeek-V3, 144 GPUs / 18 nodes, 2 slots a GPU", "deepseek-v3", "h800", 144, 288),
    Shape("DeepSeek-V3, 320 GPUs / 40 nodes, 1 slot a GPU", "deepseek-v3", "h800", 320, 320),
    Shape("DeepSeek-V3, one 72-GPU NVLink domain", "deepseek-v3", "gb200-nvl72", 72, 288),
    Shape("Kimi K2, 64 GPUs / 8 nodes", "kimi-k2", "h200", 64),
    Shape("Qwen3-235B-A22B, 16 GPUs / 2 nodes", "qwen3-235b-a22b", "h100", 16),
    Shape("Qwen3-30B-A3B, 8 GPUs / 1 node", "qwen3-30b-a3b", "h100", 8),
    Shape("GPT-OSS-120B, 8 GPUs / 1 node", "gpt-oss-120b", "b200", 8),
    Shape("GLM-4.5, 32 GPUs / 4 nodes", "glm-4.5", "h200", 32),
]
"""The issue's matrix (issue 15): the shapes every run checks."""

EXTENDED = [
    Shape("DeepSeek-V3, 256 GPUs / 32 nodes, S = 2E", "deepseek-v3", "h800", 256),
    Shape("Kimi K2, 128 GPUs / 16 nodes", "kimi-k2", "h200", 128),
    Shape("Qwen3-235B-A22B, 64 GPUs / 8 nodes", "qwen3-235b-a22b", "h100", 64),
    Shape("Qwen3-30B-A3B, 32 GPUs / 4 nodes", "qwen3-30b-a3b", "h800", 32),
    Shape("Qwen3-30B-A3B, 128 GPUs / 16 nodes, S = 2E", "qwen3-30b-a3b", "h800", 128),
    Shape("GPT-OSS-120B, 32 GPUs / 4 nodes", "gpt-oss-120b", "h800", 32),
    Shape("GPT-OSS-20B, 8 GPUs / 1 node", "gpt-oss-20b", "h100", 8),
    Shape("GPT-OSS-20B, 32 GPUs / 4 nodes, S = 2E", "gpt-oss-20b", "h800", 32),
    Shape("GLM-4.5-Air, 16 GPUs / 2 nodes", "glm-4.5-air", "h100", 16),
    Shape("Llama 4 Maverick, 16 GPUs / 2 nodes", "llama-4-maverick", "h100", 16),
]
"""More shapes (`--extended`), none of them tuned on: the default slots of the model presets
on other GPU counts, two slots an expert where G >= E, and the presets the matrix leaves out."""


def measure(shape: Shape, interval: int, seed: int, params: dict, timed: list) -> dict:
    """Both policies on one shape and window size: the figures the targets compare."""
    layout = shape.layout()
    model, cluster = model_preset(shape.model), cluster_preset(shape.cluster)
    windows = window_loads(model_trace(shape.model, num_steps=STEPS[interval], seed=seed),
                           interval)
    scoring = {"model": model, "cluster": cluster, "dispatch": "locality",
               "steps_per_window": interval, "timing_repeats": TIMING_REPEATS}
    results = {}
    for name, policy_params in (("deepseek", None), ("tape", params)):
        score = score_policy(name, windows, layout, params=policy_params, **scoring)
        results[name] = {
            "balance": score.metrics["gpu_balancedness"],
            "first": score.per_pair["gpu_balancedness"][0],
            "moved": score.metrics.get("moved_experts", 0.0),
            "ib": float(np.sum(score.per_pair["ib_tokens"])),
            "step": score.metrics["step_time_s"],
            "realistic": score.metrics["combined_score_realistic"],
            "seconds": score.metrics["avg_raw_time"],
        }
    results["reference"] = (reference_seconds(timed[0], windows, layout) if timed else None)
    return results


def checks(results: dict) -> dict[str, bool]:
    tape_, base = results["tape"], results["deepseek"]
    reference = results["reference"]
    return {
        "balance": tape_["balance"] >= base["balance"] - BALANCE_SLACK,
        "first": tape_["first"] >= base["first"] - BALANCE_SLACK,
        "moved": tape_["moved"] <= MOVED_RATIO * base["moved"],
        "IB": tape_["ib"] <= base["ib"] * (1 + 1e-9) + 1e-6,  # rounding: 0 on one node
        "step": tape_["step"] <= base["step"],
        "realistic": tape_["realistic"] >= base["realistic"],
        "runtime": tape_["seconds"] <= RUNTIME_S
        and (reference is None or tape_["seconds"] * SPEEDUP <= reference),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", type=int, default=[],
                        help=f"only shape N: 0 to {len(SHAPES) - 1} the matrix, "
                             f"{len(SHAPES)} to {len(SHAPES) + len(EXTENDED) - 1} the "
                             f"extended shapes (repeatable)")
    parser.add_argument("--extended", action="store_true",
                        help="run the extended shapes after the matrix")
    parser.add_argument("--interval", action="append", type=int, default=[],
                        help="only windows of this many steps: 100 or 1000 (repeatable)")
    parser.add_argument("--preset", default="all", help="tape preset (default: all)")
    parser.add_argument("--param", action="append", default=[], type=parameter,
                        help="NAME=VALUE overriding a preset parameter (repeatable)")
    parser.add_argument("--no-reference", action="store_true",
                        help="do not time DeepSeek's reference (the 1/50 check is skipped)")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="add this to every seed (tuning runs use seeds apart from these)")
    arguments = parser.parse_args()
    params = {"preset": arguments.preset, **dict(arguments.param)}
    timed = [] if arguments.no_reference else readings()[:1]
    if timed:
        print(f"reference: {timed[0].name}")
    every = SHAPES + EXTENDED
    if any(not 0 <= index < len(every) for index in arguments.shape):
        parser.error(f"--shape takes 0 to {len(every) - 1}")
    shapes = arguments.shape or range(len(every) if arguments.extended else len(SHAPES))
    intervals = arguments.interval or [100, 1000]
    print(f"tape parameters: {params}")
    header = (f"{'shape':<50} {'win':>4} {'S':>4} {'bal ds':>6} {'tape-ds':>7} {'first':>7} "
              f"{'moved':>6} {'IB':>6} {'step':>6} {'real':>6} {'ms':>6} {'x ref':>6}  fails")
    print(header)
    failed: dict[str, dict[str, int]] = {}  # group -> target -> cases missed
    total: dict[str, int] = {}
    for index in shapes:
        group = "matrix" if index < len(SHAPES) else "extended shapes"
        shape = every[index]
        for interval in intervals:
            seed = arguments.seed_offset + (1000 if interval == 100 else 2000) + index
            results = measure(shape, interval, seed, params, timed)
            outcome = checks(results)
            total[group] = total.get(group, 0) + 1
            missed = failed.setdefault(group, {})
            for name, ok in outcome.items():
                missed[name] = missed.get(name, 0) + (not ok)
            tape_, base, reference = results["tape"], results["deepseek"], results["reference"]
            speedup = f"{reference / tape_['seconds']:5.0f}x" if reference else "     -"
            ib = f"{tape_['ib'] / base['ib']:6.3f}" if base["ib"] > 0 else f"{'-':>6}"
            print(f"{shape.name:<50} {interval:>4} {shape.layout().num_replicas:>4} "
                  f"{base['balance']:6.3f} {tape_['balance'] - base['balance']:+7.3f} "
                  f"{tape_['first'] - base['first']:+7.3f} "
                  f"{tape_['moved'] / max(base['moved'], 1e-9):6.3f} {ib} "
                  f"{tape_['step'] / base['step']:6.3f} "
                  f"{tape_['realistic'] - base['realistic']:+6.3f} "
                  f"{tape_['seconds'] * 1e3:6.1f} {speedup}  "
                  + (", ".join(name for name, ok in outcome.items() if not ok) or "-"),
                  flush=True)
    for group, missed in failed.items():
        print(f"\nTargets met on the {group} (cases passing / cases):")
        for name, count in missed.items():
            print(f"  {name:<10} {total[group] - count}/{total[group]}")


if __name__ == "__main__":
    main()
