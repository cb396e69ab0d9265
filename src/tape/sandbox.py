"""Run a user's `rebalance_experts` program in a child process it cannot escape.

A program (a Python file that defines `rebalance_experts(weight, num_replicas, num_groups,
num_nodes, num_gpus) -> (phy2log, log2phy, logcnt)`, DeepSeek EPLB's entry point) may hang, eat
memory, crash, return garbage or look through its caller's stack for data it should not see.
`SandboxedProgram` contains all of that:

- the program is imported and called in one long-lived child process started with the `spawn`
  method (a fresh interpreter: none of the caller's memory), reused across calls and restarted
  after it is killed; the child leads its own process group, and the whole group is killed, so
  processes the program starts (a pool of workers, a subprocess) do not outlive it;
- each call sends the child only the window being balanced, so nothing in the child (stack
  frames, globals, the garbage collector) holds another window;
- each call has a hard timeout: past it the child is killed, not merely abandoned;
- the child's address space is capped (`RLIMIT_AS`, on Linux) at its size after start-up plus
  `memory_mb`, so a program that eats memory fails with a MemoryError or dies alone;
- API keys and other secrets, and the evaluator's `TAPE_*` settings (which name the windows file),
  are removed from the child's environment, and SIGINT is left to the parent (from the child's
  start: a Ctrl-C while it starts up does not reach it);
- outputs are checked in the child (a 3-tuple of integer arrays of the right shapes) and again in
  the parent (`Placement.from_maps(...).validate(...)`: consistent maps, every expert replicated);
- the seconds reported are measured in the child around the call alone, with a clock bound
  before the program was imported;
- what the program prints (stdout and stderr) is not shown: the child keeps its last few hundred
  characters, and they reach the parent only inside the reason of a call that raised ("...; its
  last output: ..."); output that bypasses `sys.stdout` (os.write, a subprocess) is dropped.

Every failure raises `tape.errors.ProgramError` with a one-line reason. The sandbox contains
faults and hides data; it is not a security boundary against code written to attack TAPE itself
(such code could, for example, forge its own timing from inside the child).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

from tape.arrays import to_numpy
from tape.errors import PlacementError, ProgramError
from tape.layout import Layout
from tape.placement import Placement

__all__ = ["ENTRY_POINT", "STARTUP_SECONDS", "SandboxedProgram"]

ENTRY_POINT = "rebalance_experts"
"""The function a program must define."""

STARTUP_SECONDS = 120.0
"""How long a fresh child may take to start its interpreter (before the program is imported)."""

_SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
_OUTPUT_TAIL_CHARS = 300
_TORCH_HINT = (
    "the program imports torch, which is not installed: install TAPE's torch extra, "
    "`pip install -e '.[torch]'` in a checkout of TAPE (a CPU build of torch is enough)"
)


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# The child process.


class _TailBuffer:
    """A write-only text stream that keeps the last few hundred characters written to it."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text = (self.text + text)[-_OUTPUT_TAIL_CHARS:]
        return len(text)

    def flush(self) -> None:
        pass


def _address_space_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _limit_memory(memory_mb: int) -> None:
    """Cap the address space at its current size plus `memory_mb` (Linux only)."""
    try:
        import resource
    except ImportError:
        return
    current = _address_space_bytes()
    if current is None:
        return
    limit = current + int(memory_mb) * 2**20
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass


def _remove_secrets() -> None:
    """Remove API keys and the like, and the evaluator's TAPE_* settings: TAPE_WINDOWS and
    TAPE_TRACE name the file holding every window the program is scored on."""
    for name in list(os.environ):
        upper = name.upper()
        if upper.startswith("TAPE_") or any(marker in upper for marker in _SECRET_MARKERS):
            del os.environ[name]


def _silence_output_descriptors() -> None:
    """Point file descriptors 1 and 2 at the null device: what bypasses `sys.stdout` (os.write,
    a subprocess, a C extension) does not reach the terminal either."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for descriptor in (1, 2):
            os.dup2(null, descriptor)
    finally:
        os.close(null)


def _describe_exception(error: BaseException, program_path: str, memory_mb: int) -> str:
    if isinstance(error, MemoryError):
        # Read after "raised" or "failed:": "rebalance_experts raised MemoryError: ...".
        return f"MemoryError: it exceeded the memory limit of {memory_mb} MB"
    where = ""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename == program_path:
            where = f" (line {frame.lineno} of the program)"
            break
    message = f": {error}" if str(error) else ""
    return f"{type(error).__name__}{message}{where}"


def _load_program(program_path: str, memory_mb: int) -> tuple[Any, bool]:
    """Import the program; return its entry point and whether it uses torch."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sandboxed_program", program_path)
    if spec is None or spec.loader is None:
        raise ProgramError(f"cannot load {program_path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ProgramError(
            f"syntax error in the program, line {error.lineno}: {error.msg}"
        ) from None
    except ModuleNotFoundError as error:
        if error.name == "torch":
            raise ProgramError(_TORCH_HINT) from None
        raise ProgramError(f"the program imports a missing module: {error.name}") from None
    except BaseException as error:  # noqa: BLE001 - any failure of foreign code is reported
        reason = _describe_exception(error, program_path, memory_mb)
        raise ProgramError(f"importing the program failed: {reason}") from None
    function = getattr(module, ENTRY_POINT, None)
    if not callable(function):
        raise ProgramError(f"the program defines no function `{ENTRY_POINT}`")
    return function, "torch" in sys.modules


def _check_outputs(result: Any, num_layers: int, num_experts: int, num_replicas: int) -> tuple:
    """The three outputs as int64 numpy arrays, with their shapes checked."""
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        kind = f"a {type(result).__name__}"
        if isinstance(result, (tuple, list)):
            kind += f" of length {len(result)}"
        raise ProgramError(
            f"{ENTRY_POINT} returned {kind}, expected a tuple (phy2log, log2phy, logcnt)"
        )
    expected = {
        "phy2log": (num_layers, num_replicas),
        "log2phy": (num_layers, num_experts, None),
        "logcnt": (num_layers, num_experts),
    }
    arrays = []
    for (name, shape), value in zip(expected.items(), result):
        try:
            array = to_numpy(value)
        except Exception as error:  # noqa: BLE001 - foreign objects may fail in any way
            raise ProgramError(f"{name} is not an array ({type(value).__name__}): {error}")
        whole_floats = array.dtype.kind == "f" and bool(
            np.all(np.isfinite(array)) and np.all(array == np.round(array))
        )
        if array.dtype.kind not in "iub" and not whole_floats:
            raise ProgramError(f"{name} must hold integers, got dtype {array.dtype}")
        if array.ndim != len(shape) or any(
            size is not None and actual != size for actual, size in zip(array.shape, shape)
        ):
            wanted = "(" + ", ".join("X" if size is None else str(size) for size in shape) + ")"
            raise ProgramError(f"{name} has shape {array.shape}, expected {wanted}")
        if name == "log2phy" and not 1 <= array.shape[2] <= num_replicas:
            raise ProgramError(
                f"log2phy has {array.shape[2]} columns, expected 1 to num_replicas ({num_replicas})"
            )
        arrays.append(np.ascontiguousarray(array, dtype=np.int64))
    return tuple(arrays)


def _run_call(
    function: Any,
    weight: np.ndarray,
    arguments: tuple[int, int, int, int],
    uses_torch: bool,
    clock: Any,
    program_path: str,
    memory_mb: int,
) -> tuple:
    """One call of the program, as the message to send back."""
    num_layers, num_experts = weight.shape
    try:
        if uses_torch:
            import torch

            argument = torch.from_numpy(weight)
        else:
            argument = weight
        start = clock()
        result = function(argument, *arguments)
        seconds = clock() - start
        outputs = _check_outputs(result, num_layers, num_experts, arguments[0])
    except ProgramError as error:
        return ("error", str(error))
    except BaseException as error:  # noqa: BLE001 - any failure of foreign code is reported
        reason = _describe_exception(error, program_path, memory_mb)
        return ("error", f"{ENTRY_POINT} raised {reason}")
    return ("ok", *outputs, float(seconds))


def _child_main(connection: Any, program_path: str, memory_mb: int) -> None:
    """The child's whole life: start, import the program, then answer calls until told to exit.

    Messages in: ("call", weight [L, E] float64, (num_replicas, num_groups, num_nodes, num_gpus))
    or ("exit",). Messages out: ("started",), then ("ready",) or ("error", reason), then one
    ("ok", phy2log, log2phy, logcnt, seconds) or ("error", reason) per call.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked while it started (`_interrupts_held`); a
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # pending Ctrl-C is dropped
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # `_stop` kills the group: what the program starts dies with it
    _remove_secrets()
    output = _TailBuffer()
    sys.stdout = sys.stderr = output
    _silence_output_descriptors()
    connection.send(("started",))
    _limit_memory(memory_mb)
    try:
        function, uses_torch = _load_program(program_path, memory_mb)
    except ProgramError as error:
        connection.send(("error", str(error)))
        return
    connection.send(("ready",))
    clock = perf_counter
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message[0] == "exit":
            return
        _, weight, arguments = message
        del message
        reply = _run_call(function, weight, arguments, uses_torch, clock, program_path, memory_mb)
        if reply[0] == "error" and reply[1].startswith(f"{ENTRY_POINT} raised") and output.text:
            reply = ("error", f"{reply[1]}; its last output: {_one_line(output.text, 200)}")
        del weight
        connection.send(reply)


# ----------------------------------------------------------------------------------------------
# The parent side.


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """SIGINT blocked in this thread, then delivered: a child started meanwhile inherits the
    block, so a Ctrl-C cannot interrupt its start-up (and print a traceback) before it ignores
    SIGINT; `_child_main` unblocks it then."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()  # launching it, a spawn would unblock SIGINT again
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _kill_group(pid: int | None) -> None:
    """Kill the process group the child `pid` leads (it and what it started), if there is one.

    Safe after the child was reaped: a process id is not reused while a group still bears it.
    """
    if pid is None or not hasattr(os, "killpg"):
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # no such group: the child never made it
        pass


class SandboxedProgram:
    """A program file whose `rebalance_experts` runs in a sandboxed child process.

    Use as a context manager (or call `close()`):

        with SandboxedProgram("best_program.py", timeout_s=30) as program:
            placement, seconds = program.call(weight, layout)

    Args:
        path: the program file.
        timeout_s: seconds one call (or the program's import) may take before the child is
            killed.
        memory_mb: megabytes of address space the program may add to the child's start-up size.
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 60.0, memory_mb: int = 4096):
        if not timeout_s > 0:
            raise ProgramError(f"timeout_s must be positive, got {timeout_s}")
        if not memory_mb > 0:
            raise ProgramError(f"memory_mb must be positive, got {memory_mb}")
        self.path = Path(path).resolve()
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self._process: Any = None
        self._connection: Any = None

    def __enter__(self) -> SandboxedProgram:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The child's process id, or None when no child is running."""
        return self._process.pid if self._process is not None else None

    def call(self, weight: np.ndarray, layout: Layout) -> tuple[Placement, float]:
        """Run `rebalance_experts(weight, S, num_groups, N, G)` in the child.

        Args:
            weight: [L, E] float64, the load of the window to balance (the only data sent).
            layout: the cluster layout whose arguments are passed on.

        Returns:
            The validated placement and the seconds the call itself took (measured in the child).

        Raises:
            ProgramError: the program could not be loaded, raised, timed out (its process is
                killed), exceeded its memory, died, or returned an invalid placement.
        """
        weight = np.ascontiguousarray(weight, dtype=np.float64)
        if weight.ndim != 2:
            raise ProgramError(f"weight must be [layers, experts], got shape {weight.shape}")
        self._ensure_started()
        arguments = (layout.num_replicas, layout.num_groups, layout.num_nodes, layout.num_gpus)
        self._connection.send(("call", weight, arguments))
        reply = self._receive(self.timeout_s, f"{ENTRY_POINT} timed out after {self.timeout_s:g} s")
        if reply[0] == "error":
            raise ProgramError(_one_line(reply[1]))
        _, phy2log, log2phy, logcnt, seconds = reply
        try:
            placement = Placement.from_maps(phy2log, log2phy, logcnt).validate(
                layout, weight.shape[0]
            )
        except PlacementError as error:
            raise ProgramError(f"{ENTRY_POINT} returned an invalid placement: {error}") from None
        if not (isinstance(seconds, float) and np.isfinite(seconds) and seconds >= 0):
            raise ProgramError(f"the child reported an invalid runtime {seconds!r}")
        return placement, seconds

    def close(self) -> None:
        """Ask the child to exit; kill it if it does not. Safe to call twice."""
        if self._process is None:
            return
        try:
            self._connection.send(("exit",))
        except (OSError, ValueError):
            pass
        self._process.join(timeout=2.0)
        self._stop()

    # -- internals --------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self._stop()
        if not self.path.is_file():
            raise ProgramError(f"program {self.path} does not exist")
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe(duplex=True)
        process = context.Process(
            target=_child_main,
            args=(child_end, str(self.path), self.memory_mb),
            name=f"tape-sandbox:{self.path.name}",
            daemon=True,
        )
        with _interrupts_held():  # a Ctrl-C while it starts is the parent's alone
            process.start()
            child_end.close()
            self._process, self._connection = process, parent_end
        self._receive(STARTUP_SECONDS, f"the sandbox did not start within {STARTUP_SECONDS:g} s")
        reply = self._receive(
            self.timeout_s, f"importing the program timed out after {self.timeout_s:g} s"
        )
        if reply[0] == "error":
            self._stop()
            raise ProgramError(_one_line(reply[1]))

    def _receive(self, timeout: float, timeout_reason: str) -> tuple:
        """The child's next message; kill it and raise ProgramError on timeout or death."""
        try:
            ready = self._connection.poll(timeout)
            if ready:
                return self._connection.recv()
        except (EOFError, OSError):
            raise ProgramError(self._death_reason()) from None
        self._stop()
        raise ProgramError(f"{timeout_reason}; its process was killed")

    def _death_reason(self) -> str:
        self._process.join(timeout=5.0)
        code = self._process.exitcode
        self._stop()
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            hint = " (out of memory?)" if name in ("SIGKILL", "SIGSEGV", "SIGABRT") else ""
            return f"the program's process died from signal {name}{hint}"
        return f"the program's process exited unexpectedly (exit code {code})"

    def _stop(self) -> None:
        if self._process is not None:
            _kill_group(self._process.pid)
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=5.0)
        if self._connection is not None:
            self._connection.close()
        self._process = self._connection = None
