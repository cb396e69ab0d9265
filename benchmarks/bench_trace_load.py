"""Benchmark: tape.trace.load_trace on an expert-load.json of the public file's size.

Writes a synthetic trace (DeepSeek-V3 shape, 1170 steps) as expert-load.json into a temporary
folder, laid out as `json.dump(indent=2)` lays it out (one number a line, about 250 MB, the size
of the public abmfy/eplb-openevolve file), then loads it in a fresh process with each of:

- `tape`: `tape.trace.load_trace` (streamed with ijson, one step at a time);
- `json`: the reference, `json.load` then `np.array` of every step's `logical_expert_load`.

For each it prints the seconds and the peak extra memory of the process (peak resident memory
during the load minus the peak before it) against the size of the file and of the final float64
array, then the ratios tape / json. Targets: peak extra memory well under 2x the final array;
time comparable to or better than json.load.

Run: python benchmarks/bench_trace_load.py [--steps 1170] [--compact]  (about a minute)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tape.synthetic import synthetic_trace
from tape.trace import describe, load_trace, write_expert_load_json

MB = 2**20


def _peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM on Linux (ru_maxrss there also counts the
    parent's peak before exec), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def _load_with_json(path: Path) -> np.ndarray:
    with open(path) as file:
        data = json.load(file)
    return np.array([step["logical_expert_load"] for step in data["load_history"]], dtype=float)


def _child(loader: str, path: Path) -> None:
    """Load `path` with `loader` in this (fresh) process; print one JSON line of measurements."""
    before = _peak_rss_bytes()
    start = time.perf_counter()
    # the parse itself, not the trace cache (`tape.trace_cache`, bench_evaluate.py measures it)
    loads = load_trace(path, cache=False) if loader == "tape" else _load_with_json(path)
    seconds = time.perf_counter() - start
    extra = _peak_rss_bytes() - before
    print(
        json.dumps(
            {
                "seconds": seconds,
                "extra": extra,
                "total": float(loads.sum()),
                "array": loads.nbytes,
                "shape": describe(loads),
            }
        )
    )


def _measure(loader: str, path: Path) -> dict:
    command = [sys.executable, __file__, "--child", loader, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1170, help="forward steps in the trace")
    parser.add_argument("--compact", action="store_true", help="write one step a line")
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], Path(args.child[1]))
        return

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "expert-load.json"
        start = time.perf_counter()
        write_expert_load_json(
            synthetic_trace(num_steps=args.steps), path, indent=None if args.compact else 2
        )
        file_bytes = path.stat().st_size
        print(f"wrote {path.name}: {file_bytes / MB:.0f} MB in {time.perf_counter() - start:.1f} s")
        results = {loader: _measure(loader, path) for loader in ("tape", "json")}

    array_bytes = results["tape"]["array"]
    print(f"trace: {results['tape']['shape']}, float64 array {array_bytes / MB:.0f} MB")
    assert results["tape"]["total"] == results["json"]["total"], "the loaders disagree"
    print(f"{'loader':<8}{'seconds':>9}{'MB/s':>8}{'peak extra MB':>15}{'x array':>9}{'x file':>8}")
    for loader, result in results.items():
        print(
            f"{loader:<8}{result['seconds']:>9.2f}{file_bytes / MB / result['seconds']:>8.0f}"
            f"{result['extra'] / MB:>15.0f}{result['extra'] / array_bytes:>9.2f}"
            f"{result['extra'] / file_bytes:>8.2f}"
        )
    tape, reference = results["tape"], results["json"]
    print(
        f"tape / json: time {tape['seconds'] / reference['seconds']:.2f}x, "
        f"peak extra memory {tape['extra'] / reference['extra']:.2f}x "
        f"(target: time <= ~1x, peak extra < 2x the array: "
        f"{tape['extra'] / array_bytes:.2f}x)"
    )


if __name__ == "__main__":
    main()
