"""Benchmark: DeepSeek's reference when every node gets one expert group (docs/policies.md).

DeepSeek-V3 has 8 expert groups. On 64 GPUs in 8 nodes (vLLM's and SGLang's EPLB pass the
model's groups and the cluster's nodes), groups % nodes == 0, so the reference runs its
hierarchical mode: each node gets exactly one group of 32 experts and its 40 slots, whatever the
groups' loads. A hot group then cannot spread beyond its node. This prints, on TAPE's synthetic
DeepSeek-V3 trace (calibrated model) under the protocol (rebalance on window i, score on
window i + 1), the next-window GPU balancedness of:

- `deepseek` as the engines call it (8 groups, 8 nodes: hierarchical, one group a node);
- `deepseek` with num_groups = 1 (the reference's global packing: replicas over all GPUs);
- `deepseek` on 4 nodes of 16 GPUs (2 groups a node), for comparison;
- `tape` (the default preset), same layout as the engines'.

Run: python benchmarks/bench_group_per_node.py [--seeds 0 1 2] [--steps 1200]
"""

from __future__ import annotations

import argparse

import numpy as np

import tape.policies.tape  # noqa: F401  (registers "tape")
from tape.layout import Layout
from tape.metrics import gpu_balancedness
from tape.placement import PlacedWindow, Placement
from tape.policies import get_policy
from tape.protocol import score_policy
from tape.synthetic import model_trace
from tape.trace import window_loads


def balance_of(placements: list[Placement], windows: np.ndarray, layout: Layout) -> float:
    """Mean over pairs of next-window GPU balancedness (`tape.metrics.gpu_balancedness`)."""
    return float(np.mean([gpu_balancedness(PlacedWindow.checked(p, windows[index + 1], layout))
                          for index, p in enumerate(placements)]))


def run(seed: int, steps: int) -> dict[str, float]:
    windows = window_loads(model_trace("deepseek-v3", num_steps=steps, seed=seed), 100)
    engines = Layout(320, 8, 8, 64)
    deepseek = get_policy("deepseek")
    results = {}
    for name, layout in (("deepseek, 8 groups on 8 nodes (hierarchical)", engines),
                         ("deepseek, num_groups=1 (global)", Layout(320, 1, 8, 64)),
                         ("deepseek, 8 groups on 4 nodes", Layout(320, 8, 4, 64))):
        placements = [deepseek(window, layout) for window in windows[:-1]]
        results[name] = balance_of(placements, windows, engines)
    scored = score_policy("tape", windows, engines, dispatch="locality",
                          steps_per_window=100)
    results["tape (default), 8 groups on 8 nodes"] = scored.metrics["gpu_balancedness"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1200)
    arguments = parser.parse_args()
    rows: dict[str, list[float]] = {}
    for seed in arguments.seeds:
        for name, value in run(seed, arguments.steps).items():
            rows.setdefault(name, []).append(value)
    print(f"DeepSeek-V3, 64 GPUs, 320 slots, synthetic trace seeds {arguments.seeds}, "
          "next-window GPU balancedness (per seed, mean):")
    for name, values in rows.items():
        cells = " ".join(f"{value:.3f}" for value in values)
        print(f"  {name:<46} {cells}   mean {np.mean(values):.3f}")


if __name__ == "__main__":
    main()
