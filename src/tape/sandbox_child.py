"""The child side of `tape.sandbox`: a script that imports a program and answers calls.

Run as `python -I -B sandbox_child.py PROGRAM MEMORY_MB [PARENT_PID]` inside the sandbox (`-B`:
no `__pycache__` beside the program), with the reply channel on its standard input and output.
It imports nothing but the standard library and numpy (nothing of TAPE, whose package the child
need not see), so it also serves as the one definition of the wire format, which `tape.sandbox`
imports.

Wire format, both ways: a frame is a 4-byte big-endian length, that many bytes of a JSON object
(the header), then the raw C-order bytes of each array the header's `arrays` lists as
`{"dtype": "<f8" or "<i8", "shape": [...]}`. No pickles: nothing a reader decodes can run code.

Messages in: `{"kind": "call", "id": ID, "arguments": [num_replicas, num_groups, num_nodes,
num_gpus], "arrays": [weight [L, E] <f8]}` or `{"kind": "exit"}`. Messages out: `{"kind":
"started"}`, then `{"kind": "ready"}` or `{"kind": "error", "reason": ...}` once the program is
imported, then per call `{"kind": "ok", "id": ID, "arrays": [phy2log [L, S], log2phy [L, E, X],
logcnt [L, E], all <i8]}` or `{"kind": "error", "id": ID, "reason": ...}`.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import traceback
from typing import Any, BinaryIO

import numpy as np

ENTRY_POINT = "rebalance_experts"
"""The function a program must define."""

WIRE_DTYPES = ("<f8", "<i8")
"""The array dtypes a frame may carry: the window (float64) and the three maps (int64)."""

MAX_HEADER_BYTES = 65536
"""The largest header a reader accepts."""

_LENGTH = struct.Struct(">I")
_OUTPUT_TAIL_CHARS = 300
_TORCH_HINT = (
    "the program imports torch, which is not installed: install TAPE's torch extra, "
    "`pip install -e '.[torch]'` in a checkout of TAPE (a CPU build of torch is enough)"
)


def encode_frame(header: dict[str, Any], arrays: tuple[np.ndarray, ...] = ()) -> bytes:
    """One frame: `header` (its `arrays` field filled in from `arrays`) and the arrays' bytes."""
    described = dict(header)
    if arrays:
        described["arrays"] = [
            {"dtype": array.dtype.str, "shape": list(array.shape)} for array in arrays
        ]
    text = json.dumps(described).encode()
    return b"".join([_LENGTH.pack(len(text)), text, *(array.tobytes() for array in arrays)])


def frame_length(prefix: bytes) -> int:
    """The header length a frame's 4-byte prefix gives; ValueError past MAX_HEADER_BYTES."""
    (length,) = _LENGTH.unpack(prefix)
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"a message header of {length} bytes, at most {MAX_HEADER_BYTES}")
    return length


def array_nbytes(described: Any) -> tuple[np.dtype, tuple[int, ...], int]:
    """The dtype, shape and byte count of one entry of a header's `arrays`; ValueError when it
    is not a WIRE_DTYPES dtype with a shape of non-negative integers."""
    if not isinstance(described, dict) or described.get("dtype") not in WIRE_DTYPES:
        raise ValueError("an array of an unexpected dtype")
    shape = described.get("shape")
    if not isinstance(shape, list) or not all(
        type(size) is int and 0 <= size < 2**31 for size in shape
    ):
        raise ValueError("an array with a malformed shape")
    dtype = np.dtype(described["dtype"])
    return dtype, tuple(shape), int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


# ----------------------------------------------------------------------------------------------
# The child's life.


def _read_exactly(stream: BinaryIO, count: int) -> bytes:
    data = stream.read(count)
    if data is None or len(data) != count:
        raise EOFError
    return data


def _read_frame(stream: BinaryIO) -> tuple[dict[str, Any], list[np.ndarray]]:
    header = json.loads(_read_exactly(stream, frame_length(_read_exactly(stream, 4))))
    arrays = []
    for described in header.get("arrays", []):
        dtype, shape, nbytes = array_nbytes(described)
        arrays.append(np.frombuffer(_read_exactly(stream, nbytes), dtype=dtype).reshape(shape))
    return header, arrays


class _TailBuffer:
    """A write-only text stream that keeps the last few hundred characters written to it."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text = (self.text + str(text))[-_OUTPUT_TAIL_CHARS:]
        return len(text)

    def flush(self) -> None:
        pass


def _limit_memory(memory_mb: int) -> None:
    """Cap the address space at its current size plus `memory_mb` (Linux only)."""
    try:
        import resource

        with open("/proc/self/statm") as statm:
            current = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, ValueError):
        pass


def _describe_exception(error: BaseException, program_path: str, memory_mb: int) -> str:
    if isinstance(error, MemoryError):
        # Read after "raised" or "failed:": "rebalance_experts raised MemoryError: ...".
        return f"MemoryError: it exceeded the memory limit of {memory_mb} MB"
    where = ""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename == program_path:
            where = f" (line {frame.lineno} of the program)"
            break
    try:
        message = str(error)
    except BaseException:  # noqa: BLE001 - a hostile __str__
        message = "(its message could not be read)"
    return f"{type(error).__name__}{': ' + message if message else ''}{where}"


class _Failure(Exception):
    """A reason to send back instead of a result."""


def _load_program(program_path: str, memory_mb: int) -> tuple[Any, bool]:
    """Import the program; return its entry point and whether it uses torch."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sandboxed_program", program_path)
    if spec is None or spec.loader is None:
        raise _Failure(f"cannot load {os.path.basename(program_path)} as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise _Failure(f"syntax error in the program, line {error.lineno}: {error.msg}") from None
    except ModuleNotFoundError as error:
        if error.name == "torch":
            raise _Failure(_TORCH_HINT) from None
        raise _Failure(f"the program imports a missing module: {error.name}") from None
    except BaseException as error:  # noqa: BLE001 - any failure of foreign code is reported
        reason = _describe_exception(error, program_path, memory_mb)
        raise _Failure(f"importing the program failed: {reason}") from None
    function = getattr(module, ENTRY_POINT, None)
    if not callable(function):
        raise _Failure(f"the program defines no function `{ENTRY_POINT}`")
    return function, "torch" in sys.modules


def _as_array(value: Any) -> np.ndarray:
    """A numpy array of an array-like or a torch tensor on any device."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _check_outputs(result: Any, num_layers: int, num_experts: int, num_replicas: int) -> tuple:
    """The three outputs as int64 numpy arrays, with their dtypes and shapes checked."""
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        kind = f"a {type(result).__name__}"
        if isinstance(result, (tuple, list)):
            kind += f" of length {len(result)}"
        raise _Failure(f"{ENTRY_POINT} returned {kind}, expected a tuple (phy2log, log2phy, logcnt)")
    expected = {
        "phy2log": (num_layers, num_replicas),
        "log2phy": (num_layers, num_experts, None),
        "logcnt": (num_layers, num_experts),
    }
    arrays = []
    for (name, shape), value in zip(expected.items(), result):
        try:
            array = _as_array(value)
        except Exception as error:  # noqa: BLE001 - foreign objects may fail in any way
            raise _Failure(f"{name} is not an array ({type(value).__name__}): {error}") from None
        whole_floats = array.dtype.kind == "f" and bool(
            np.all(np.isfinite(array)) and np.all(array == np.round(array))
        )
        if array.dtype.kind not in "iub" and not whole_floats:
            raise _Failure(f"{name} must hold integers, got dtype {array.dtype}")
        if array.ndim != len(shape) or any(
            size is not None and actual != size for actual, size in zip(array.shape, shape)
        ):
            wanted = "(" + ", ".join("X" if size is None else str(size) for size in shape) + ")"
            raise _Failure(f"{name} has shape {array.shape}, expected {wanted}")
        if name == "log2phy" and not 1 <= array.shape[2] <= num_replicas:
            raise _Failure(
                f"log2phy has {array.shape[2]} columns, expected 1 to num_replicas ({num_replicas})"
            )
        arrays.append(np.ascontiguousarray(array, dtype="<i8"))
    return tuple(arrays)


def _answer(function: Any, header: dict, weight: np.ndarray, uses_torch: bool,
            program_path: str, memory_mb: int, output: _TailBuffer) -> bytes:
    """The reply frame to one call."""
    num_layers, num_experts = weight.shape
    arguments = [int(value) for value in header["arguments"]]
    reply = {"id": header["id"]}
    try:
        if uses_torch:
            import torch

            argument = torch.from_numpy(weight)
        else:
            argument = weight
        result = function(argument, *arguments)
        outputs = _check_outputs(result, num_layers, num_experts, arguments[0])
    except _Failure as failure:
        return encode_frame({**reply, "kind": "error", "reason": str(failure)})
    except BaseException as error:  # noqa: BLE001 - any failure of foreign code is reported
        reason = f"{ENTRY_POINT} raised {_describe_exception(error, program_path, memory_mb)}"
        if output.text:
            reason += f"; its last output: {' '.join(output.text.split())}"
        return encode_frame({**reply, "kind": "error", "reason": reason})
    return encode_frame({**reply, "kind": "ok"}, outputs)


def _send(channel: BinaryIO, frame: bytes) -> None:
    channel.write(frame)
    channel.flush()


def _die_with(parent: int) -> None:
    """Be killed when process `parent` dies (Linux's `PR_SET_PDEATHSIG`); exit if it has."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def main(program_path: str, memory_mb: int, parent: int | None = None) -> None:
    """Start, import the program, then answer calls until told to exit (or the channel ends).
    With `parent` (partial isolation), die when that process does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:
        _die_with(parent)
    channel_in = os.fdopen(os.dup(0), "rb")
    channel_out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    for descriptor in (0, 1, 2):  # what bypasses sys.stdout (os.write, a subprocess) is dropped
        os.dup2(null, descriptor)
    os.close(null)
    output = _TailBuffer()
    sys.stdin, sys.stdout, sys.stderr = None, output, output  # type: ignore[assignment]
    _send(channel_out, encode_frame({"kind": "started"}))
    _limit_memory(memory_mb)
    try:
        function, uses_torch = _load_program(program_path, memory_mb)
    except _Failure as failure:
        _send(channel_out, encode_frame({"kind": "error", "reason": str(failure)}))
        return
    _send(channel_out, encode_frame({"kind": "ready"}))
    while True:
        try:
            header, arrays = _read_frame(channel_in)
        except (EOFError, ValueError):
            return
        if header.get("kind") != "call":
            return
        weight = arrays[0].copy()  # writable, as the program may expect
        del arrays
        _send(channel_out,
              _answer(function, header, weight, uses_torch, program_path, memory_mb, output))
        del weight


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
