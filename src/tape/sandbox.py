"""Run a user's `rebalance_experts` program in a child process it cannot escape.

A program (a Python file that defines `rebalance_experts(weight, num_replicas, num_groups,
num_nodes, num_gpus) -> (phy2log, log2phy, logcnt)`, DeepSeek EPLB's entry point) may hang, eat
memory, crash, return garbage, forge its runtime, attack the evaluator or look for data it should
not see (LLM-written candidates learn to cheat when they can). `SandboxedProgram` contains that:

- the program is imported and called in one long-lived child process (`tape.sandbox_child`, a
  fresh interpreter that holds nothing of the caller's), reused across calls and restarted after
  it is killed; under `bwrap` isolation (`tape.isolation`) the child has its own PID namespace,
  no network and no files but the Python installation, the program and a private tmpfs;
- each call sends the child only the window being balanced;
- the reply channel carries JSON headers and raw arrays, never pickles; the parent checks the
  header, dtypes and shapes before reading an array, and the maps' ranges and consistency
  (`Placement.from_maps(...).validate(...)`) before using them; a malformed reply is a failure;
- the seconds of a call are measured here, around the call as seen from outside the child
  (sending the window, the call, receiving the maps): no clock the program can reach decides
  them; a reply that arrives before its call was sent is refused;
- each call has a hard timeout, and all calls (and the import) together a time budget; past
  either the child and every process it started are killed;
- the child's address space is capped (`RLIMIT_AS`, on Linux) at its size after start-up plus
  `memory_mb`; under bwrap its tmpfs is capped at `memory_mb` too;
- the child's environment holds nothing of the evaluator's; a failure's reason is one line,
  stripped of control characters and escape sequences, capped in length, and any value of the
  evaluator's secret variables (API keys, tokens) in it is masked;
- what the program prints is not shown: its last few hundred characters reach the parent only
  inside the reason of a call that raised ("...; its last output: ...").

Every failure raises `tape.errors.ProgramError` with a one-line reason.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import unicodedata
from pathlib import Path
from time import perf_counter

import numpy as np

from tape import sandbox_child
from tape.errors import PlacementError, ProgramError
from tape.isolation import (
    Isolation,
    kill_process_tree,
    partial_environment,
    resolve_isolation,
    sandbox_command,
)
from tape.layout import Layout
from tape.placement import Placement
from tape.sandbox_child import ENTRY_POINT, array_nbytes, encode_frame, frame_length

__all__ = [
    "BUDGET_TIMEOUTS",
    "ENTRY_POINT",
    "REASON_CHARS",
    "STARTUP_SECONDS",
    "SandboxedProgram",
    "clean_reason",
]

STARTUP_SECONDS = 120.0
"""How long a fresh child may take to start its interpreter (before the program is imported)."""

BUDGET_TIMEOUTS = 5
"""The default time budget of a program over all its calls, in timeouts."""

REASON_CHARS = 500
"""The longest failure reason, in characters."""

_SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, screen clears
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window titles, hyperlinks, clipboard
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC strings
    r"|\x1b[ -/]*[0-~]?"  # any other escape
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
)


def clean_reason(text: object, limit: int = REASON_CHARS) -> str:
    """`text` as one printable line: escape sequences, control and format characters removed,
    the values of this process's secret variables (API keys, tokens) masked, whitespace runs
    made one space, cut to `limit` characters."""
    line = _ESCAPE_SEQUENCE.sub("", str(text))
    line = "".join(
        " " if character.isspace() else character
        for character in line
        if character.isspace() or unicodedata.category(character)[0] != "C"
    )
    for name, value in os.environ.items():
        if len(value) >= 8 and any(marker in name.upper() for marker in _SECRET_MARKERS):
            line = line.replace(value, "***")
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


_POLL_SLICE_S = 0.2
"""The longest single wait in `_ready`. The kernel may hand a signal (SIGTERM, SIGHUP) to any
thread of the evaluator (numpy's, the progress bar's); Python then only notes it, and the main
thread runs the handler (which ends the command, `tape.cli`) when it next runs Python code. A
main thread asleep in one poll for the whole call's timeout would not stop for minutes."""


def _ready(descriptor: int, event: int, deadline: float) -> bool:
    """Wait until `descriptor` is ready for `event` (select.POLLIN or POLLOUT; a closed or
    broken end counts as ready) or `deadline` (a `perf_counter` time) passes; _Timeout then.
    False: not yet (at most `_POLL_SLICE_S` waited; ask again). poll, not select: an evaluator
    may hold more than FD_SETSIZE files."""
    wait = deadline - perf_counter()
    if wait <= 0:
        raise _Timeout
    poller = select.poll()
    poller.register(descriptor, event)
    return bool(poller.poll(max(1, int(min(wait, _POLL_SLICE_S) * 1000))))


class _Timeout(Exception):
    """The child did not answer before the deadline."""


class _Malformed(Exception):
    """The child sent something the protocol does not allow."""


class _Died(Exception):
    """The child closed the channel: it exited or was killed."""


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
        budget_s: seconds all calls and imports together may take (default BUDGET_TIMEOUTS x
            `timeout_s`); past it every call fails.
        isolation: "auto", "strict" or "partial" (`tape.isolation`); `self.isolation` is the
            one that runs ("bwrap" or "partial").

    Raises:
        ProgramError: a limit that is not positive.
        IsolationError: `isolation` is unknown, or strict where bwrap cannot run.
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 60.0, memory_mb: int = 4096,
                 budget_s: float | None = None, isolation: str = "auto"):
        if not timeout_s > 0:
            raise ProgramError(f"timeout_s must be positive, got {timeout_s}")
        if not memory_mb > 0:
            raise ProgramError(f"memory_mb must be positive, got {memory_mb}")
        budget_s = BUDGET_TIMEOUTS * float(timeout_s) if budget_s is None else budget_s
        if not budget_s > 0:
            raise ProgramError(f"budget_s must be positive, got {budget_s}")
        self.path = Path(path).resolve()
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.budget_s = float(budget_s)
        self.spent_s = 0.0
        self._isolation: Isolation = resolve_isolation(isolation)
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    def __enter__(self) -> SandboxedProgram:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def isolation(self) -> str:
        """The isolation the program runs with: "bwrap" or "partial"."""
        return self._isolation.name

    @property
    def pid(self) -> int | None:
        """The child's process id (bwrap's, under bwrap isolation), or None when none runs."""
        return self._process.pid if self._process is not None else None

    def call(self, weight: np.ndarray, layout: Layout) -> tuple[Placement, float]:
        """Run `rebalance_experts(weight, S, num_groups, N, G)` in the child.

        Args:
            weight: [L, E] float64, the load of the window to balance (the only data sent).
            layout: the cluster layout whose arguments are passed on.

        Returns:
            The validated placement and the seconds the call took, measured here from sending
            the window to receiving the maps (the child's start and the import not included).

        Raises:
            ProgramError: the program could not be loaded, raised, timed out, ran past its
                budget (its process is killed), exceeded its memory, died, sent a malformed
                reply, or returned an invalid placement.
        """
        weight = np.ascontiguousarray(weight, dtype="<f8")
        if weight.ndim != 2:
            raise ProgramError(f"weight must be [layers, experts], got shape {weight.shape}")
        self._ensure_started()
        call_id = secrets.token_hex(8)
        header = {"kind": "call", "id": call_id, "arguments": [
            layout.num_replicas, layout.num_groups, layout.num_nodes, layout.num_gpus]}
        num_layers, num_experts = weight.shape
        expected = [(num_layers, layout.num_replicas), (num_layers, num_experts, None),
                    (num_layers, num_experts)]
        if self._pending():
            self._stop()
            raise ProgramError("the program wrote to the reply channel outside a call; "
                               "its process was killed")
        timeout, reason = self._limit(f"{ENTRY_POINT} timed out after {self.timeout_s:g} s")
        start = perf_counter()
        try:
            reply, arrays = self._exchange(encode_frame(header, (weight,)), start + timeout,
                                           expected, reason)
        finally:
            self.spent_s += perf_counter() - start
        seconds = perf_counter() - start
        if reply.get("id") != call_id:
            self._stop()
            raise ProgramError("the program's reply does not answer the call; its process was "
                               "killed")
        if reply["kind"] == "error":
            raise ProgramError(clean_reason(reply.get("reason")))
        try:
            placement = Placement.from_maps(*arrays).validate(layout, num_layers)
        except PlacementError as error:
            raise ProgramError(clean_reason(
                f"{ENTRY_POINT} returned an invalid placement: {error}")) from None
        return placement, seconds

    def close(self) -> None:
        """Ask the child to exit, then kill it and all it started. Safe to call twice."""
        if self._process is None:
            return
        try:
            self._send(encode_frame({"kind": "exit"}), perf_counter() + 1.0)
            self._process.wait(timeout=2.0)
        except (_Timeout, _Died, subprocess.TimeoutExpired):
            pass
        self._stop()

    # -- internals --------------------------------------------------------------------------

    def _limit(self, timeout_reason: str) -> tuple[float, str]:
        """The seconds the next wait may take and the reason to give past them (the timeout,
        or the rest of the budget when that is shorter); ProgramError if no budget is left."""
        left = self.budget_s - self.spent_s
        budget_reason = (f"{ENTRY_POINT} ran past its time budget of {self.budget_s:g} s over "
                         "all calls")
        if left <= 0:
            self._stop()
            raise ProgramError(budget_reason)
        if left < self.timeout_s:
            return left, budget_reason
        return self.timeout_s, timeout_reason

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self._stop()
        if not self.path.is_file():
            raise ProgramError(f"program {self.path} does not exist")
        self._workdir = Path(tempfile.mkdtemp(prefix="tape-sandbox-"))
        command = sandbox_command(
            self._isolation, Path(sandbox_child.__file__), self.path, self.memory_mb,
            self._workdir)
        partial = self._isolation.name == "partial"
        try:
            self._process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, start_new_session=True,
                env=partial_environment(self._workdir) if partial else {},
                cwd=self._workdir, close_fds=True,
            )
        except OSError as error:
            self._stop()
            raise ProgramError(f"cannot start the sandbox: {error}") from None
        for stream in (self._process.stdin, self._process.stdout):
            os.set_blocking(stream.fileno(), False)
        self._expect_status(perf_counter() + STARTUP_SECONDS,
                            f"the sandbox did not start within {STARTUP_SECONDS:g} s")
        timeout, reason = self._limit(f"importing the program timed out after {self.timeout_s:g} s")
        start = perf_counter()
        try:
            self._expect_status(start + timeout, reason)
        finally:
            self.spent_s += perf_counter() - start

    def _expect_status(self, deadline: float, timeout_reason: str) -> None:
        """Read the child's "started" or "ready" message; ProgramError on anything else."""
        reply, _ = self._exchange(None, deadline, None, timeout_reason)
        if reply["kind"] == "error":
            self._stop()
            raise ProgramError(clean_reason(reply.get("reason")))
        if reply["kind"] not in ("started", "ready"):
            self._stop()
            raise ProgramError("the program sent a malformed message: an unexpected kind")

    def _pending(self) -> bool:
        """Whether the child sent something nobody asked for yet (or closed the channel)."""
        poller = select.poll()
        poller.register(self._process.stdout.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        descriptor = self._process.stdin.fileno()
        try:
            while view:
                if _ready(descriptor, select.POLLOUT, deadline):
                    try:
                        view = view[os.write(descriptor, view):]
                    except BlockingIOError:
                        continue
        except (OSError, ValueError):  # a broken pipe: the child is gone
            raise _Died from None

    def _read(self, count: int, deadline: float) -> bytes:
        chunks, missing = [], count
        descriptor = self._process.stdout.fileno()
        while missing:
            if not _ready(descriptor, select.POLLIN, deadline):
                continue
            try:
                chunk = os.read(descriptor, min(missing, 1 << 20))
            except BlockingIOError:
                continue
            if not chunk:
                raise _Died
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def _exchange(self, request: bytes | None, deadline: float, expected: list | None,
                  timeout_reason: str) -> tuple[dict, list[np.ndarray]]:
        """Send `request` (if any), then read the child's next message: its header and arrays
        (three int64 maps of the `expected` shapes, None standing for any size from 1 to S,
        after an "ok"; none otherwise). The child is killed and ProgramError raised on a
        timeout, its death, or a message the protocol does not allow."""
        try:
            if request is not None:
                self._send(request, deadline)
            return self._read_message(deadline, expected)
        except _Timeout:
            self._stop()
            raise ProgramError(f"{timeout_reason}; its process was killed") from None
        except _Died:
            raise ProgramError(self._death_reason()) from None
        except _Malformed as error:
            self._stop()
            raise ProgramError(f"the program sent a malformed reply: {error}; its process was "
                               "killed") from None

    def _read_message(self, deadline: float, expected: list | None
                      ) -> tuple[dict, list[np.ndarray]]:
        try:
            length = frame_length(self._read(4, deadline))
            header = json.loads(self._read(length, deadline))
        except (ValueError, RecursionError) as error:
            raise _Malformed(clean_reason(error, 100)) from None
        if not isinstance(header, dict) or header.get("kind") not in (
            ("ok", "error") if expected is not None else ("started", "ready", "error")
        ):
            raise _Malformed("an unexpected message")
        described = header.get("arrays", [])
        if header["kind"] != "ok":
            if described:
                raise _Malformed("arrays in a message that carries none")
            return header, []
        if not isinstance(described, list) or len(described) != 3:
            raise _Malformed("expected three arrays")
        layouts = []
        for name, entry, shape in zip(("phy2log", "log2phy", "logcnt"), described, expected):
            try:
                dtype, actual, nbytes = array_nbytes(entry)
            except ValueError as error:
                raise _Malformed(f"{name}: {error}") from None
            wanted = tuple(shape[:2] + (actual[2:3] if len(shape) == 3 else ()))
            if dtype != np.dtype("<i8") or actual != wanted or (
                len(shape) == 3 and not 1 <= actual[2] <= expected[0][1]
            ):
                raise _Malformed(f"{name} of dtype {dtype} and shape {actual}")
            layouts.append((dtype, actual, nbytes))
        arrays = [np.frombuffer(self._read(nbytes, deadline), dtype=dtype).reshape(shape)
                  for dtype, shape, nbytes in layouts]
        return header, arrays

    def _death_reason(self) -> str:
        try:
            code = self._process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            code = None
        self._stop()
        number = -code if code is not None and code < 0 else None
        if code is not None and code > 128 and self.isolation == "bwrap":
            number = code - 128  # bwrap exits with 128 + the signal that killed the program
        if number is None:
            return f"the program's process exited unexpectedly (exit code {code})"
        name = signal.Signals(number).name if number in signal.valid_signals() else str(number)
        hint = " (out of memory?)" if name in ("SIGKILL", "SIGSEGV", "SIGABRT") else ""
        return f"the program's process died from signal {name}{hint}"

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            kill_process_tree(process.pid)
            try:
                process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
            for stream in (process.stdin, process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
