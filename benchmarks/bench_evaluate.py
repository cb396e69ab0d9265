"""Benchmark: `tape evaluate --scoring 4` against the seed evaluator's loading and scoring.

Writes a synthetic DeepSeek-V3 trace (1,200 steps, 58 layers x 256 experts) as a compact
`expert-load.json` into a temporary folder and scores `src/tape/evolve_assets/initial_program.py`
(DeepSeek's EPLB) with version 4 on its 12 windows (11 pairs), each in a fresh process:

- `seed`: a reading of the seed evaluator (`examples/eplb/TAPE_evaluator.py` of
  github.com/emmanuel2406/TAPE), written here from its description: `json.load` of the whole
  file, a torch tensor per window (`torch.tensor(steps).sum(dim=0)`), then per pair the program
  called in-process and version 4 scored as the seed does, with Python loops reading one torch
  element at a time (`.item()`) over layers, experts, replicas and source GPUs;
- `tape cold`: `tape evaluate PROGRAM --trace FILE --scoring 4 --json` with an empty trace cache
  (`TAPE_CACHE_DIR` a new folder): the trace is parsed and cached;
- `tape warm`: the same command again: the trace is memory-mapped from the cache.

Each is timed as the wall clock of its whole process (interpreter start-up and imports
included), and the ratios seed / tape are printed. Targets: >= 25x cold, >= 40x warm. Both score
the same placements; their v4 scores are printed side by side (the seed counts its scoring time
in the speed score, so `combined_score` differs; balancedness, communication and weight copy
agree).

Needs torch (the seed evaluator's tensors): `pip install torch==2.13.0`.
With `--fast-program` the program is one whose calls cost almost nothing (slot s holds expert
s % E), so that the ratios measure the two evaluators alone.

Run: python benchmarks/bench_evaluate.py [--steps 1200] [--fast-program]  (about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ROOT / "src" / "tape" / "evolve_assets" / "initial_program.py"
INTERVAL = 100
REPLICAS, GROUPS, NODES, GPUS = 288, 8, 4, 32
INTRA_NODE, INTER_NODE = 1.0, 18.0
TARGETS = {"tape cold": 25.0, "tape warm": 40.0}


FAST_PROGRAM = """
import numpy as np

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    layers, experts = np.shape(weight)
    phy2log = np.tile(np.arange(num_replicas) % experts, (layers, 1))
    logcnt = np.stack([np.bincount(row, minlength=experts) for row in phy2log])
    log2phy = np.full((layers, experts, int(logcnt.max())), -1)
    for slot in range(num_replicas):
        log2phy[:, slot % experts, slot // experts] = slot
    return phy2log, log2phy, logcnt
"""
"""A program whose calls cost almost nothing (slot s holds expert s % E): with it, the ratios
measure the evaluators alone, loading, sandbox and scoring."""


def _seed_scores(path: Path, program_path: Path = PROGRAM) -> dict:
    """The seed evaluator's loading and version 4 scoring, read from its description."""
    import importlib.util

    import torch

    with open(path) as file:
        data = json.load(file)
    history = data["load_history"]
    windows = [
        torch.tensor([step["logical_expert_load"] for step in history[start : start + INTERVAL]])
        .sum(dim=0)
        for start in range(0, len(history), INTERVAL)
    ]
    spec = importlib.util.spec_from_file_location("program", program_path)
    program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(program)
    parts = {"balancedness": [], "communication": [], "weight_copy": [], "seconds": []}
    for index in range(len(windows) - 1):
        start = time.perf_counter()
        _, log2phy, logcnt = program.rebalance_experts(windows[index], REPLICAS, GROUPS, NODES,
                                                       GPUS)
        balancedness, communication = _seed_simulation(log2phy, logcnt, windows[index + 1])
        parts["weight_copy"].append(_seed_weight_copy(log2phy, logcnt))
        parts["balancedness"].append(balancedness)
        parts["communication"].append(communication)
        parts["seconds"].append(time.perf_counter() - start)
    return {name: sum(values) / len(values) for name, values in parts.items()}


def _seed_simulation(log2phy, logcnt, workload) -> tuple[float, float]:
    """Slot balancedness and the communication score, one element at a time."""
    import torch

    num_layers, num_experts = workload.shape
    slots_per_gpu, gpus_per_node = REPLICAS // GPUS, GPUS // NODES
    slot_load = torch.zeros(num_layers, REPLICAS, dtype=torch.float)
    for layer in range(num_layers):
        for expert in range(num_experts):
            load, count = workload[layer][expert].item(), int(logcnt[layer][expert].item())
            if load > 0 and count > 0:
                slot_load[layer, log2phy[layer][expert][:count]] += load / count
    balancedness = slot_load.mean(dim=1).sum().item() / slot_load.max(dim=1).values.sum().item()
    actual = minimum = 0.0
    for layer in range(num_layers):
        for expert in range(num_experts):
            tokens, count = workload[layer][expert].item(), int(logcnt[layer][expert].item())
            if tokens <= 0 or count <= 0:
                continue
            share = tokens / (GPUS * count)
            for _source in range(GPUS):
                minimum += share * (min(count, gpus_per_node) - 1) * INTRA_NODE
            for slot in log2phy[layer][expert][:count]:
                target = int(slot.item()) // slots_per_gpu
                for source in range(GPUS):
                    if source != target:
                        same_node = source // gpus_per_node == target // gpus_per_node
                        actual += share * (INTRA_NODE if same_node else INTER_NODE)
    total = workload.sum().item()
    exposed = max(actual - 0.1 * total, 0.0)
    exposed_minimum = max(minimum - 0.1 * total, 0.0)
    return balancedness, (10 * exposed_minimum / exposed if exposed > 0 else 0.0)


def _seed_weight_copy(log2phy, logcnt) -> float:
    """The version 4 weight-copy score, one element at a time."""
    num_layers, num_experts = logcnt.shape
    slots_per_gpu, gpus_per_node = REPLICAS // GPUS, GPUS // NODES
    actual = minimum = 0.0
    for layer in range(num_layers):
        for expert in range(num_experts):
            count = int(logcnt[layer][expert].item())
            primary = int(log2phy[layer][expert][0].item()) // slots_per_gpu
            for rank in range(1, count):
                gpu = int(log2phy[layer][expert][rank].item()) // slots_per_gpu
                if gpu != primary:
                    same_node = gpu // gpus_per_node == primary // gpus_per_node
                    actual += INTRA_NODE if same_node else INTER_NODE
            minimum += max(count - slots_per_gpu, 0) * INTRA_NODE
    return 1.0 if actual == 0 else min(minimum / actual, 1.0)


def _timed(command: list[str], environment: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    result = subprocess.run(command, check=False, capture_output=True, text=True,
                            env=environment)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    return seconds, json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200, help="forward steps in the trace")
    parser.add_argument("--fast-program", action="store_true",
                        help="score a program whose calls cost almost nothing instead of "
                        "DeepSeek's EPLB: the evaluators' own time alone")
    parser.add_argument("--child", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_seed_scores(*args.child)))
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("the seed evaluator's reading needs torch: pip install torch==2.13.0")
    from tape.synthetic import synthetic_trace
    from tape.trace import write_expert_load_json

    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "expert-load.json"
        write_expert_load_json(synthetic_trace(num_steps=args.steps), trace)
        print(f"trace: {args.steps} steps, {trace.stat().st_size / 2**20:.0f} MB of JSON")
        environment = {**os.environ, "TAPE_CACHE_DIR": str(Path(folder) / "cache")}
        program = PROGRAM
        if args.fast_program:
            program = Path(folder) / "fast_program.py"
            program.write_text(FAST_PROGRAM)
        print(f"program: {program.name}")
        tape = [shutil.which("tape") or "tape", "evaluate", str(program), "--trace",
                str(trace), "--scoring", "4", "--json"]
        seconds, results = {}, {}
        seconds["tape cold"], results["tape cold"] = _timed(tape, environment)
        seconds["tape warm"], results["tape warm"] = _timed(tape, environment)
        seed_command = [sys.executable, __file__, "--child", str(trace), str(program)]
        seconds["seed"], results["seed"] = _timed(seed_command, environment)

    seed, ours = results["seed"], results["tape warm"]
    for name in ("balancedness", "communication", "weight_copy"):
        print(f"{name + '_score':<22} seed {seed[name]:.6f}  tape {ours[name + '_score']:.6f}")
    print(f"{'run':<10}{'seconds':>9}{'seed / run':>12}{'target':>8}")
    for name, value in seconds.items():
        ratio = seconds["seed"] / value
        target = f">= {TARGETS[name]:.0f}x" if name in TARGETS else ""
        verdict = "" if name not in TARGETS else ("  ok" if ratio >= TARGETS[name] else "  MISSED")
        print(f"{name:<10}{value:>9.2f}{ratio:>11.1f}x{target:>8}{verdict}")


if __name__ == "__main__":
    main()
