"""Expert-load traces: read them, check them, cut them into windows, and write the JSON format.

A trace is a float64 array `loads[steps, L, E]`: the tokens routed to each logical expert of each
MoE layer in each forward step. `load_trace` reads every format of SPEC "Trace formats":

- `*.json`: `{"load_history": [{"logical_expert_load": [[...E] * L]}, ...]}`, one entry a step
  (the abmfy/eplb-openevolve data set). Streamed: one step is parsed at a time (ijson, with its
  C backend when installed) into blocks of steps, and the blocks are copied into the result one
  by one while each is freed, so the peak is about one result plus one block (pages of the
  result are only committed by the operating system as they are written).
- a folder of `*.csv` files (the seed notebook's `moe_token_dist`): one file a layer, layer order
  by natural sort of the file names (`layer_2.csv` before `layer_10.csv`), rows are batches,
  columns experts, no header. If every file has the same number of rows, row r of every file
  forms step r (`[rows, L, E]`); otherwise each layer's column sums form a single step
  (`[1, L, E]`, the seed's reading).
- `*.pt`: SGLang's expert-distribution dump, a dict with key `logical_count` or a bare tensor
  `[steps, L, E]` (needs PyTorch, imported only here).
- `*.npy` / `*.npz`: an array `[steps, L, E]` (an `.npz` with one array, or an array `loads`).

In `.pt`, `.npy` and `.npz` files an array `[L, E]` is read as a single step. A single-step
trace loads, but `window_loads` refuses it with a message that names these cases: no interval
cuts one step into the two windows a replay needs.

Every failure to read a trace is a one-line `TraceError` naming the file: damaged contents, an
operating-system error (a file that cannot be opened or read), or a trace too big for memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tape.arrays import dense_numpy
from tape.errors import TraceError, checked_integer, counted
from tape.files import atomic_output
from tape.trace_cache import cached_read
from tape.trace_formats import (
    JSON_LOAD_KEY,
    STEPS_PER_BLOCK,
    read_csv_folder,
    read_expert_load_json,
    read_numpy,
    read_torch_dump,
    unreadable,
)

__all__ = [
    "MAX_LOAD",
    "STEPS_PER_BLOCK",
    "check_load",
    "check_loads",
    "describe",
    "load_trace",
    "window_loads",
    "write_expert_load_json",
]


MAX_LOAD = float(2**53)
"""The largest load of an expert in a step or a window: loads are token counts, exact in
float64 up to 2**53; far larger ones overflow the policies' float32 and the metrics' sums of
squares (RuntimeWarnings, then meaningless scores)."""


def describe(loads: np.ndarray) -> str:
    """A short description of a trace's shape, e.g. "1170 steps x 58 layers x 256 experts"."""
    names = ("step", "layer", "expert")
    return " x ".join(counted(size, name) for size, name in zip(np.shape(loads), names))


def check_loads(
    loads: Any,
    *,
    num_layers: int | None = None,
    num_experts: int | None = None,
    source: str = "loads",
    unit: str = "step",
) -> np.ndarray:
    """Validate a trace array and return it as float64 `[steps, L, E]` (no copy if it is one).

    The one rule set for loads wherever they enter TAPE (files, the Python API, serving
    engines); `check_load` applies it to a single window `[L, E]`.

    Args:
        loads: array-like (numpy or torch) `[steps, L, E]` of token counts.
        num_layers, num_experts: the L and E the trace must have (e.g. from the model or the
            cluster), or None to accept any.
        source: what the array came from (a file name), to start error messages with.
        unit: what the first axis counts, for error messages ("step", or "window" for loads
            already summed into windows).

    Raises:
        TraceError: ragged, not three non-empty dimensions, non-numeric, NaN or infinite or
            negative values or values above MAX_LOAD, or L or E other than asked.
    """
    return _checked(loads, (f"{unit}s", "layers", "experts"), num_layers, num_experts, source)


def check_load(
    weight: Any,
    *,
    num_layers: int | None = None,
    num_experts: int | None = None,
    source: str = "weight",
) -> np.ndarray:
    """Validate one window's load `[L, E]` by `check_loads`' rules; float64 (no copy if it is).

    Raises:
        TraceError: as `check_loads`, for an array `[layers, experts]`.
    """
    return _checked(weight, ("layers", "experts"), num_layers, num_experts, source)


def _checked(
    loads: Any, axes: tuple[str, ...], num_layers: int | None, num_experts: int | None,
    source: str,
) -> np.ndarray:
    """`check_loads` and `check_load`: `axes` names the dimensions ("steps", "layers",
    "experts" or the last two)."""
    shape_text = f"[{', '.join(axes)}]"
    try:
        array = dense_numpy(loads, source, TraceError)
    except TraceError:
        raise
    except ValueError:
        raise TraceError(
            f"{source}: loads must be a rectangular array {shape_text}, got ragged nested "
            f"sequences"
        ) from None
    if array.dtype.kind not in "iuf":
        raise TraceError(f"{source}: loads must be numbers, got dtype {array.dtype}")
    if array.ndim != len(axes) or 0 in array.shape:
        raise TraceError(
            f"{source}: loads must have shape {shape_text}, all non-empty, got {array.shape}"
        )
    array = np.ascontiguousarray(array, dtype=np.float64)  # no copy when it already is one

    def where(mask: np.ndarray) -> tuple[str, tuple[int, ...]]:
        index = tuple(int(i) for i in np.argwhere(mask)[0])
        text = f"load of expert {index[-1]} in layer {index[-2]}"
        if len(index) == 3:
            text += f" at {axes[0][:-1]} {index[0]}"
        return text, index

    bad = ~np.isfinite(array)
    if bad.any():
        text, index = where(bad)
        in_all = counted(int(bad.sum()), "NaN or infinite value")
        raise TraceError(f"{source}: {text} is {array[index]} ({in_all} in all)")
    if array.min() < 0:
        text, index = where(array < 0)
        raise TraceError(
            f"{source}: {text} is negative ({array[index]}); loads are non-negative token counts"
        )
    if array.max() > MAX_LOAD:
        text, index = where(array > MAX_LOAD)
        raise TraceError(
            f"{source}: {text} is {_count_text(array[index])}, more than {MAX_LOAD:.0f} (2**53, "
            f"the largest token count float64 holds exactly)"
        )
    for expected, actual, name in (
        (num_layers, array.shape[-2], "layers"),
        (num_experts, array.shape[-1], "experts"),
    ):
        if expected is not None and actual != expected:
            if len(axes) == 3:
                raise TraceError(
                    f"{source}: trace has {actual} {name}, expected {expected} ({describe(array)})"
                )
            raise TraceError(
                f"{source} has {actual} {name}, expected {expected} (shape {array.shape})"
            )
    return array


def _count_text(value: float) -> str:
    """A load for a message: whole below 1e17 (so 2**53 + 2 does not read as 9.007e+15, the same
    as the limit), else in scientific notation."""
    return f"{value:.0f}" if value < 1e17 else f"{value:.4g}"


def window_loads(loads: Any, interval: int = 100) -> np.ndarray:
    """Sum consecutive steps into windows: `[steps, L, E]` -> `[W, L, E]`, W = ceil(steps / interval).

    Window w is the sum of steps `w * interval` to `min((w + 1) * interval, steps) - 1`. As in
    the seed's evaluator, the last `steps % interval` steps, if any, form a last, shorter window
    (the public 1,170-step trace gives 12 windows at interval 100).

    Raises:
        TraceError: `interval` not a positive integer, a malformed trace, or a trace of a single
            step (no interval cuts it into the two or more windows the protocol compares).
    """
    checked_integer(interval, "interval", TraceError)
    loads = check_loads(loads)
    if loads.shape[0] == 1:
        raise TraceError(
            f"the trace holds a single step ({describe(loads)}), and no --interval cuts one "
            f"step into the 2 or more windows a replay needs: a folder of CSV files is read as "
            f"one step (each layer file's column sums) when its files have different row counts "
            f"or one row each (for steps, give every file the same rows: row r is step r), and "
            f"so is an array [layers, experts] in a .npy, .npz or .pt file"
        )
    starts = np.arange(0, loads.shape[0], interval)
    return np.add.reduceat(loads, starts, axis=0)


def load_trace(path: str | os.PathLike, *, cache: bool = True) -> np.ndarray:
    """Read a trace file or folder (formats: module doc) as float64 `[steps, L, E]`.

    With `cache`, a `.json` or `.pt` file is parsed once and its loads kept in the trace cache
    (`tape.trace_cache`: `TAPE_CACHE_DIR`, `TAPE_CACHE_MAX_MB`); later calls memory-map them
    (a read-only array) while the file's size and modification time are unchanged.

    Raises:
        TraceError: a one-line message naming the file and what was wrong with it, also when the
            operating system cannot open or read one of its files, or the trace does not fit in
            memory.
    """
    path = Path(path)
    try:
        if cache:
            return cached_read(path, _read_trace)
        return _read_trace(path)
    except OSError as error:
        # A file that cannot be opened or read (permissions, a folder named like a layer file,
        # an I/O error): the file the system names, else the trace's path.
        raise unreadable(error.filename if error.filename is not None else path, error) from None
    except MemoryError:
        raise TraceError(
            f"{path}: the trace does not fit in memory (MemoryError while loading it); free "
            f"memory or use a shorter trace"
        ) from None


def _read_trace(path: Path) -> np.ndarray:
    if not path.exists():
        raise TraceError(f"{path}: no such trace file or folder")
    if path.is_dir():
        return check_loads(read_csv_folder(path), source=str(path))
    readers = {
        ".json": read_expert_load_json,
        ".pt": read_torch_dump,
        ".npy": read_numpy,
        ".npz": read_numpy,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise TraceError(
            f"{path}: unknown trace format {path.suffix or '(no extension)'!r}; expected "
            f"{', '.join(readers)} or a folder of .csv files"
        )
    return check_loads(reader(path), source=str(path))


def write_expert_load_json(
    loads: Any, path: str | os.PathLike, *, indent: int | None = None
) -> None:
    """Write a trace `[steps, L, E]` as `{"load_history": [{"logical_expert_load": ...}, ...]}`.

    Written one step at a time (never the whole text in memory), into a temporary file that
    replaces `path` only when complete. Whole-number loads are written as integers.

    Args:
        loads: `[steps, L, E]` non-negative finite loads.
        path: the `.json` file to write (its folder is made if missing).
        indent: None for compact lines (one step a line), or spaces per nesting level as
            `json.dump(indent=...)` lays it out (one number a line, as the public file).
    """
    loads = check_loads(loads)
    whole = bool(np.all(loads == np.floor(loads)))
    pad = "" if indent is None else " " * indent
    newline = "" if indent is None else "\n"
    entry_open = f'{pad * 2}{{{newline}{pad * 3}"{JSON_LOAD_KEY}": '
    entry_close = f"{newline}{pad * 2}}}"
    separator = ",\n" if indent is not None else "\n,"
    with atomic_output(Path(path)) as temporary, open(temporary, "w", encoding="ascii") as file:
        file.write(f'{{{newline}{pad}"load_history": [\n')
        for index, step in enumerate(loads):
            file.write(separator if index else "")
            file.write(entry_open + _step_json(step, whole, indent) + entry_close)
        file.write(f"\n{pad}]{newline}}}\n")


def _step_json(step: np.ndarray, whole: bool, indent: int | None) -> str:
    """One step [L, E] as JSON text; with `indent`, laid out at the depth of a step's loads."""
    values = step.astype(np.int64) if whole else step
    compact = json.dumps(values.tolist(), separators=(",", ":"))
    if indent is None:
        return compact
    row_pad, number_pad = " " * (4 * indent), " " * (5 * indent)
    rows = compact[2:-2].split("],[")
    body = f"\n{row_pad}],\n{row_pad}[\n".join(
        number_pad + row.replace(",", f",\n{number_pad}") for row in rows
    )
    return f"[\n{row_pad}[\n{body}\n{row_pad}]\n{' ' * (3 * indent)}]"
