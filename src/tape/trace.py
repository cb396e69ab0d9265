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
import math
import os
import re
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import ijson
import numpy as np

from tape.arrays import to_numpy
from tape.errors import TraceError, checked_integer, counted
from tape.files import atomic_output

__all__ = [
    "STEPS_PER_BLOCK",
    "check_loads",
    "describe",
    "load_trace",
    "window_loads",
    "write_expert_load_json",
]

STEPS_PER_BLOCK = 64
"""Steps of a JSON trace parsed into one block before the blocks are joined."""

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_NUMPY_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
"""What numpy's readers raise on a damaged `.npy` or `.npz` (BadZipFile is not an OSError)."""

_JSON_ENTRIES = "load_history.item"
_JSON_LOAD_KEY = "logical_expert_load"
_JSON_KINDS = {
    "start_map": "object",
    "start_array": "list",
    "string": "string",
    "number": "number",
    "integer": "number",
    "double": "number",
    "boolean": "boolean",
    "null": "null",
}


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

    Args:
        loads: array-like (numpy or torch) `[steps, L, E]` of token counts.
        num_layers, num_experts: the L and E the trace must have (e.g. from the model or the
            cluster), or None to accept any.
        source: what the array came from (a file name), to start error messages with.
        unit: what the first axis counts, for error messages ("step", or "window" for loads
            already summed into windows).

    Raises:
        TraceError: ragged, not three non-empty dimensions, non-numeric, NaN or infinite or
            negative values, or L or E other than asked.
    """
    try:
        array = to_numpy(loads)
    except ValueError:
        raise TraceError(
            f"{source}: loads must be a rectangular array [{unit}s, layers, experts], got ragged "
            f"nested sequences"
        ) from None
    if array.dtype.kind not in "iuf":
        raise TraceError(f"{source}: loads must be numbers, got dtype {array.dtype}")
    if array.ndim != 3 or 0 in array.shape:
        raise TraceError(
            f"{source}: loads must have shape [{unit}s, layers, experts], all non-empty, "
            f"got {array.shape}"
        )
    array = np.asarray(array, dtype=np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        step, layer, expert = np.argwhere(bad)[0]
        in_all = counted(int(bad.sum()), "NaN or infinite value")
        raise TraceError(
            f"{source}: load of expert {expert} in layer {layer} at {unit} {step} is "
            f"{array[step, layer, expert]} ({in_all} in all)"
        )
    if array.min() < 0:
        step, layer, expert = np.argwhere(array < 0)[0]
        raise TraceError(
            f"{source}: load of expert {expert} in layer {layer} at {unit} {step} is negative "
            f"({array[step, layer, expert]}); loads are non-negative token counts"
        )
    for expected, actual, name in (
        (num_layers, array.shape[1], "layers"),
        (num_experts, array.shape[2], "experts"),
    ):
        if expected is not None and actual != expected:
            raise TraceError(
                f"{source}: trace has {actual} {name}, expected {expected} ({describe(array)})"
            )
    return array


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


def load_trace(path: str | os.PathLike) -> np.ndarray:
    """Read a trace file or folder (formats: module doc) as float64 `[steps, L, E]`.

    Raises:
        TraceError: a one-line message naming the file and what was wrong with it, also when the
            operating system cannot open or read one of its files, or the trace does not fit in
            memory.
    """
    path = Path(path)
    try:
        return _read_trace(path)
    except OSError as error:
        # A file that cannot be opened or read (permissions, a folder named like a layer file,
        # an I/O error): the file the system names, else the trace's path.
        raise _unreadable(error.filename if error.filename is not None else path, error) from None
    except MemoryError:
        raise TraceError(
            f"{path}: the trace does not fit in memory (MemoryError while loading it); free "
            f"memory or use a shorter trace"
        ) from None


def _unreadable(file: str | os.PathLike, error: OSError) -> TraceError:
    """The operating system's error on opening or reading a trace file, one line."""
    return TraceError(f"{file}: cannot read it: {error.strerror or _first_line(error)}")


def _read_trace(path: Path) -> np.ndarray:
    if not path.exists():
        raise TraceError(f"{path}: no such trace file or folder")
    if path.is_dir():
        return _read_csv_folder(path)
    readers = {
        ".json": _read_expert_load_json,
        ".pt": _read_torch_dump,
        ".npy": _read_numpy,
        ".npz": _read_numpy,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise TraceError(
            f"{path}: unknown trace format {path.suffix or '(no extension)'!r}; expected "
            f"{', '.join(readers)} or a folder of .csv files"
        )
    return reader(path)


def _ijson_backend() -> Any:
    """ijson's C backend (yajl2_c) when installed, else its best available one."""
    try:
        return ijson.get_backend("yajl2_c")
    except ImportError:
        return ijson


def _step_array(entry: Any, step: int, path: Path) -> np.ndarray:
    """One JSON entry's `logical_expert_load` as an array [L, E], or a TraceError saying why."""
    if not isinstance(entry, dict) or _JSON_LOAD_KEY not in entry:
        raise TraceError(f"{path}: load_history[{step}] has no {_JSON_LOAD_KEY!r} key")
    rows = entry[_JSON_LOAD_KEY]
    if not isinstance(rows, list) or not all(isinstance(row, list) and row for row in rows):
        raise TraceError(
            f"{path}: step {step}: {_JSON_LOAD_KEY} must be a list of per-layer lists of loads"
        )
    if not rows:
        raise TraceError(f"{path}: step {step}: {_JSON_LOAD_KEY} has no layers")
    for layer, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise TraceError(
                f"{path}: ragged load at step {step}: layer {layer} has "
                f"{counted(len(row), 'expert')}, layer 0 has {len(rows[0])}"
            )
    try:
        array = np.array(rows)
    except (TypeError, ValueError, OverflowError):
        array = None
    if array is None or array.dtype.kind not in "iuf" or array.ndim != 2:
        raise TraceError(
            f"{path}: step {step} holds non-numeric or out-of-range loads (expected numbers)"
        )
    return array


def _read_expert_load_json(path: Path) -> np.ndarray:
    backend = _ijson_backend()
    blocks: list[np.ndarray] = []
    num_steps = 0
    with open(path, "rb") as file:
        try:
            for step, entry in enumerate(backend.items(file, _JSON_ENTRIES, use_float=True)):
                array = _step_array(entry, step, path)
                if not blocks:
                    first_shape = array.shape
                elif array.shape != first_shape:
                    raise TraceError(
                        f"{path}: ragged load at step {step}: "
                        f"{counted(array.shape[0], 'layer')} x {counted(array.shape[1], 'expert')}, "
                        f"step 0 has {first_shape[0]} x {first_shape[1]}"
                    )
                if num_steps % STEPS_PER_BLOCK == 0:
                    blocks.append(np.empty((STEPS_PER_BLOCK, *first_shape)))
                blocks[-1][num_steps % STEPS_PER_BLOCK] = array
                num_steps += 1
        except ijson.JSONError as error:
            raise TraceError(f"{path}: malformed JSON ({_one_line(error)})") from None
    if num_steps == 0:
        raise TraceError(f"{path}: {_describe_missing_history(path, backend)}")
    return check_loads(_join_blocks(blocks, num_steps), source=str(path))


def _one_line(error: Exception) -> str:
    """ijson's (yajl's) multi-line parse error as one line: the reason and the text near it.

    yajl's C backend gives its message as bytes when the text near the error is not UTF-8.
    """
    message = error.args[0] if len(error.args) == 1 else str(error)
    if isinstance(message, bytes):
        message = message.decode("utf-8", errors="replace")
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    if len(lines) > 2:
        reason += f" near {lines[1]!r}"
    if "NaN" in reason or "Infinity" in reason:
        reason += "; JSON has no NaN or Infinity"
    return reason


def _first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error's message (or of a text); an error without a
    message gives its type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def _join_blocks(blocks: list[np.ndarray | None], num_steps: int) -> np.ndarray:
    """Concatenate blocks of steps into [num_steps, L, E], freeing each block once copied."""
    joined = np.empty((num_steps, *blocks[0].shape[1:]))
    for index in range(len(blocks)):
        start = index * STEPS_PER_BLOCK
        stop = min(start + STEPS_PER_BLOCK, num_steps)
        joined[start:stop] = blocks[index][: stop - start]
        blocks[index] = None
    return joined


def _describe_missing_history(path: Path, backend: Any) -> str:
    """Why a well-formed JSON file yielded no steps: no `load_history`, not a list, or empty."""
    with open(path, "rb") as file:
        events = backend.parse(file)
        for prefix, event, value in events:
            if prefix == "" and event not in ("start_map", "map_key", "end_map"):
                return (
                    f"expected a JSON object with a 'load_history' list, got a JSON "
                    f"{_JSON_KINDS[event]}"
                )
            if prefix == "" and event == "map_key" and value == "load_history":
                _, kind, _ = next(events)
                if kind == "start_array":
                    return "'load_history' is empty: the trace has no steps"
                return f"'load_history' must be a list of steps, got a JSON {_JSON_KINDS[kind]}"
    return 'no \'load_history\' key (expected {"load_history": [{"logical_expert_load": ...}]})'


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _read_csv_layer(file: Path) -> np.ndarray:
    """One layer's CSV as [rows, E] float64."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            array = np.loadtxt(file, delimiter=",", dtype=np.float64, ndmin=2)
    except OSError as error:
        raise _unreadable(file, error) from None
    except ValueError as error:
        raise TraceError(
            f"{file}: not a CSV of numbers without a header: {_csv_reason(error)}"
        ) from None
    if array.size == 0:
        raise TraceError(f"{file}: empty CSV file (expected rows of per-expert loads)")
    return array


def _csv_reason(error: ValueError) -> str:
    """numpy.loadtxt's error in our words: rows counted from 1 (numpy counts some from 0) and
    without its hint about `usecols`, an argument of numpy that TAPE's user cannot pass."""
    message = _first_line(error)
    columns = re.search(r"number of columns changed from (\d+) to (\d+) at row (\d+)", message)
    if columns:
        before, after, row = columns.groups()
        return (
            f"row {row} has {counted(after, 'value')}, the rows before it {before} (one value an "
            f"expert)"
        )
    number = re.search(r"could not convert string (.*) to \w+ at row (\d+), column (\d+)", message)
    if number:
        text, row, column = number.groups()
        what = "is empty" if text in ("''", '""') else f"holds {text}, not a number"
        return f"row {int(row) + 1}, column {column} {what}"
    return message.split("; use `usecols`")[0]


def _read_csv_folder(folder: Path) -> np.ndarray:
    files = sorted(
        (file for file in folder.iterdir() if file.suffix.lower() == ".csv"),
        key=lambda file: _natural_key(file.name),
    )
    if not files:
        raise TraceError(f"{folder}: no .csv files in this folder (expected one file a layer)")
    layers = [_read_csv_layer(file) for file in files]
    num_experts = layers[0].shape[1]
    for file, layer in zip(files, layers):
        if layer.shape[1] != num_experts:
            raise TraceError(
                f"{file}: {counted(layer.shape[1], 'expert')} (columns), but {files[0].name} has "
                f"{num_experts}"
            )
    if len({layer.shape[0] for layer in layers}) == 1:
        loads = np.stack(layers, axis=1)
    else:
        loads = np.stack([layer.sum(axis=0) for layer in layers])[None]
    return check_loads(loads, source=str(folder))


def _read_torch_dump(path: Path) -> np.ndarray:
    try:
        import torch
    except ImportError:
        raise TraceError(
            f"{path}: reading a .pt expert-distribution dump needs PyTorch: install TAPE's "
            f"torch extra, `pip install -e '.[torch]'` in a checkout of TAPE (a CPU build of "
            f"torch is enough)"
        ) from None
    if path.stat().st_size == 0:
        raise TraceError(f"{path}: empty file (expected a torch.save dump)")
    # Opened here, so that an operating-system error is told as one (by load_trace), not as a
    # damaged dump.
    with open(path, "rb") as file:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about pickle protocols on stderr
                data = torch.load(file, map_location="cpu", weights_only=True)
        except (MemoryError, OSError):
            raise  # told by load_trace
        except Exception as error:  # noqa: BLE001 (torch.load raises many kinds: pickle, zip, ...)
            raise TraceError(
                f"{path}: torch.load cannot read it safely as tensors; truncated, damaged or not "
                f"a torch dump? ({_torch_reason(error)})"
            ) from None
    if isinstance(data, dict):
        if "logical_count" not in data:
            raise TraceError(
                f"{path}: no 'logical_count' in the dump (keys: {', '.join(map(str, data))})"
            )
        data = data["logical_count"]
    if not isinstance(data, torch.Tensor):
        raise TraceError(
            f"{path}: expected a tensor or a dict with key 'logical_count', got "
            f"{type(data).__name__}"
        )
    if data.dtype == torch.bool or data.is_complex():
        raise TraceError(f"{path}: logical_count must hold counts, got dtype {data.dtype}")
    return _steps_from_array(data.detach().to(device="cpu", dtype=torch.float64).numpy(), path)


def _torch_reason(error: Exception) -> str:
    """The gist of torch.load's error, one sentence: its safe loader (`weights_only=True`)
    explains at length how to load unsafely, which TAPE never does."""
    message = str(error)
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    message = re.sub(r"^\s*\[enforce fail at [^\]]*\][\s.]*", "", message)
    reason = _first_line(message) or type(error).__name__
    return reason.split(". ")[0].rstrip(".")


def _read_numpy(path: Path) -> np.ndarray:
    """An `.npy` or `.npz` file's array; any file numpy cannot read is a one-line TraceError.

    numpy decides the format by the file's first bytes, not its name, and reads an `.npz`'s
    arrays only when asked, so a damaged archive fails at either step, with errors of many
    kinds (zip, zlib, EOF, value): each becomes a TraceError naming the file. An array's header
    is checked against the bytes that follow it before numpy allocates the array.
    """
    with open(path, "rb") as file:
        magic = file.read(len(_NPY_MAGIC))
    if not magic:
        raise TraceError(f"{path}: empty file (expected a .npy or .npz array)")
    if not magic.startswith((_NPY_MAGIC, *_ZIP_MAGICS)):
        raise TraceError(
            f"{path}: not a valid .npy or .npz file (it starts with neither numpy's .npy "
            f"header nor a zip header)"
        )
    kind = ".npy" if magic.startswith(_NPY_MAGIC) else ".npz"
    try:
        if kind == ".npy":
            with open(path, "rb") as file:
                _check_array_size(file, path.stat().st_size, path, kind, "its header", "the file")
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                names = data.files
                if len(names) != 1 and "loads" not in names:
                    raise TraceError(
                        f"{path}: expected one array or an array named 'loads', found "
                        f"{', '.join(names) or 'none'}"
                    )
                name = "loads" if "loads" in names else names[0]
                member = name if name in data.zip.namelist() else f"{name}.npy"  # as numpy
                with data.zip.open(member) as stream:
                    size = data.zip.getinfo(member).file_size
                    header = f"the header of {member!r}"
                    _check_array_size(stream, size, path, kind, header, "the member")
                data = data[name]
                if not isinstance(data, np.ndarray):
                    raise TraceError(f"{path}: {name!r} in the archive is not a .npy array")
    except TraceError:
        raise
    except _NUMPY_READ_ERRORS as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise  # the operating system's error, told by load_trace (numpy's own have no errno)
        if "allow_pickle" in str(error):
            raise TraceError(
                f"{path}: holds Python objects (an object array), not numbers; TAPE does not "
                f"unpickle files"
            ) from None
        raise TraceError(
            f"{path}: not a valid {kind} file, truncated or damaged? ({_first_line(error)})"
        ) from None
    return _steps_from_array(data, path)


def _check_array_size(
    stream: Any, size: int, path: Path, kind: str, header: str, holder: str
) -> None:
    """Refuse an `.npy` array whose header promises more data than its `size` bytes hold.

    numpy allocates the array its header describes before reading it, so a truncated file or a
    damaged header (say (10**6, 58, 256) float64 in a 1 KB file) would be a MemoryError. A
    stream that does not start with the `.npy` magic is left to numpy, and so is an object
    array (pickled, refused by numpy without pickle).

    Args:
        stream: the `.npy` bytes (a file or an archive member), at their start.
        size: the bytes of the whole `.npy` (header and data).
        kind: ".npy" or ".npz", the file's format for the message.
        header, holder: the header's and the bytes' holder's names for the message.
    """
    if stream.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
        return
    stream.seek(0)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    if dtype.hasobject:
        return
    if any(length < 0 for length in shape):
        raise TraceError(
            f"{path}: not a valid {kind} file, truncated or damaged? ({header} gives the shape "
            f"{shape})"
        )
    needed = math.prod(shape) * dtype.itemsize
    held = size - stream.tell()
    if needed > held:
        raise TraceError(
            f"{path}: not a valid {kind} file, truncated or damaged? ({header} says {needed:,} "
            f"bytes of data, {shape} {dtype}, {holder} has {held:,})"
        )


def _steps_from_array(array: np.ndarray, path: Path) -> np.ndarray:
    """A file's array as a trace; an array [L, E] is read as one step."""
    if array.ndim == 2:
        array = array[None]
    return check_loads(array, source=str(path))


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
    entry_open = f'{pad * 2}{{{newline}{pad * 3}"{_JSON_LOAD_KEY}": '
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
