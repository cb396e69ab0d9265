"""Per-format trace readers: each turns one file or folder into an unchecked array of loads.

The formats are those of SPEC "Trace formats", described in `tape.trace`, whose `load_trace`
picks the reader by the path and checks what it returns (`check_loads`). A reader returns
`[steps, L, E]` (an array `[L, E]` in a `.pt`, `.npy` or `.npz` file as a single step) and
raises a one-line `TraceError` naming the file when its contents are damaged; an
operating-system error or a MemoryError is left to `load_trace` to tell.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import zipfile
import zlib
from itertools import chain
from pathlib import Path
from typing import Any

import ijson
import numpy as np

from tape.errors import TraceError, counted

__all__ = [
    "JSON_LOAD_KEY",
    "STEPS_PER_BLOCK",
    "read_csv_folder",
    "read_expert_load_json",
    "read_numpy",
    "read_torch_dump",
    "unreadable",
]

STEPS_PER_BLOCK = 64
"""Steps of a JSON trace parsed into one block before the blocks are joined."""

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_NUMPY_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
"""What numpy's readers raise on a damaged `.npy` or `.npz` (BadZipFile is not an OSError)."""

_JSON_ENTRIES = "load_history.item"
JSON_LOAD_KEY = "logical_expert_load"
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


def unreadable(file: str | os.PathLike, error: OSError) -> TraceError:
    """The operating system's error on opening or reading a trace file, one line."""
    return TraceError(f"{file}: cannot read it: {error.strerror or _first_line(error)}")


def _ijson_backend() -> Any:
    """ijson's C backend (yajl2_c) when installed, else its best available one."""
    try:
        return ijson.get_backend("yajl2_c")
    except ImportError:
        return ijson


def _step_array(entry: Any, step: int, path: Path) -> np.ndarray:
    """One JSON entry's `logical_expert_load` as an array [L, E], or a TraceError saying why."""
    if not isinstance(entry, dict) or JSON_LOAD_KEY not in entry:
        raise TraceError(f"{path}: load_history[{step}] has no {JSON_LOAD_KEY!r} key")
    rows = entry[JSON_LOAD_KEY]
    if not isinstance(rows, list) or not all(isinstance(row, list) and row for row in rows):
        raise TraceError(
            f"{path}: step {step}: {JSON_LOAD_KEY} must be a list of per-layer lists of loads"
        )
    if not rows:
        raise TraceError(f"{path}: step {step}: {JSON_LOAD_KEY} has no layers")
    for layer, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise TraceError(
                f"{path}: ragged load at step {step}: layer {layer} has "
                f"{counted(len(row), 'expert')}, layer 0 has {len(rows[0])}"
            )
    try:  # numpy would read a JSON true among numbers as 1
        array = None if bool in set(map(type, chain.from_iterable(rows))) else np.array(rows)
    except (TypeError, ValueError, OverflowError):
        array = None
    if array is None or array.dtype.kind not in "iuf" or array.ndim != 2:
        raise TraceError(
            f"{path}: step {step} holds non-numeric or out-of-range loads (expected numbers)"
        )
    return array


def read_expert_load_json(path: Path) -> np.ndarray:
    """A `.json` trace's `load_history` as [steps, L, E], streamed a step at a time."""
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
            raise TraceError(f"{path}: malformed JSON ({_parse_error_text(error)})") from None
    if num_steps == 0:
        raise TraceError(f"{path}: {_describe_missing_history(path, backend)}")
    return _join_blocks(blocks, num_steps)


def _parse_error_text(error: Exception) -> str:
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
        raise unreadable(file, error) from None
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


def read_csv_folder(folder: Path) -> np.ndarray:
    """A folder of per-layer `.csv` files as [rows, L, E], or [1, L, E] of column sums."""
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
    return loads


def read_torch_dump(path: Path) -> np.ndarray:
    """An SGLang `.pt` dump's `logical_count` (or bare tensor) as [steps, L, E] float64."""
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
    try:
        if data.layout != torch.strided:  # a sparse tensor: numpy takes only dense ones
            data = data.to_dense()
        array = data.detach().to(device="cpu", dtype=torch.float64).numpy()
    except (RuntimeError, TypeError, ValueError) as error:
        raise TraceError(
            f"{path}: logical_count ({data.layout}, {data.dtype}) cannot be read as an array of "
            f"counts ({_first_line(error)})"
        ) from None
    return _steps_from_array(array)


def _torch_reason(error: Exception) -> str:
    """The gist of torch.load's error, one sentence: its safe loader (`weights_only=True`)
    explains at length how to load unsafely, which TAPE never does."""
    message = str(error)
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    message = re.sub(r"^\s*\[enforce fail at [^\]]*\][\s.]*", "", message)
    reason = _first_line(message) or type(error).__name__
    return reason.split(". ")[0].rstrip(".")


def read_numpy(path: Path) -> np.ndarray:
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
    return _steps_from_array(data)


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


def _steps_from_array(array: np.ndarray) -> np.ndarray:
    """A file's array as steps, unchecked; an array [L, E] is read as one step."""
    if array.ndim == 2:
        array = array[None]
    return array
