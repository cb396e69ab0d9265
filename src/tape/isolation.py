"""How `tape.sandbox` starts a program's process, and how it ends the process and all it started.

Two isolations, named in every result that ran a program:

- `bwrap` (Linux, the `bubblewrap` system package): the child runs under `bwrap --unshare-all
  --cap-drop ALL --die-with-parent --new-session` in its own PID, network, IPC and mount
  namespaces, with no capabilities (and as nobody in a user namespace of its own where the
  evaluator runs as root and user namespaces work). It sees
  read-only binds of what Python needs (`/usr`, the `/lib*` links, the interpreter's prefixes),
  the program file (as `/sandbox/program.py`), a fresh `/proc` (its own processes only), a
  minimal `/dev` and a private tmpfs `/tmp`; its environment holds HOME, TMPDIR, PATH and LANG
  only. TAPE's package is readable (a program written by `tape tune` imports it), but not its
  synthetic trace generator (with the seed, a program could regenerate its windows). Killing
  bwrap, or the evaluator's death (SIGKILL and SIGHUP included), kills every process in the
  namespace.
- `partial`, where bwrap is missing or user namespaces are refused: the child is a plain process
  in its own session with a clean environment and a private temporary folder as working folder,
  killed with its parent (`PR_SET_PDEATHSIG`); at a stop, its session, process group and
  descendants are swept. It can still read the evaluator's files and `/proc` (command line,
  environment), reach the network, and a process it detaches can outlive a killed evaluator.

`isolation` settings: `auto` (bwrap if it works, else partial with a one-line warning), `strict`
(bwrap, else `IsolationError`), `partial` (never bwrap).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tape.errors import IsolationError

__all__ = [
    "ISOLATION_SETTINGS",
    "Isolation",
    "IsolationWarning",
    "bwrap_failure",
    "check_isolation",
    "kill_process_tree",
    "partial_environment",
    "resolve_isolation",
    "sandbox_command",
]

ISOLATION_SETTINGS = ("auto", "strict", "partial")
"""What a caller may ask for; see the module docstring."""

SANDBOX_FOLDER = "/sandbox"
"""Where the child script and the program appear under bwrap."""

_INSTALL_HINT = ("install the bubblewrap system package (Debian/Ubuntu: apt-get install "
                 "bubblewrap) and allow user namespaces")
_PARTIAL_NOTE = ("programs run with partial isolation ({why}): a program can read this "
                 "machine's files and the evaluator's command line and environment through "
                 "/proc, and reach the network; for full isolation " + _INSTALL_HINT)


class IsolationWarning(UserWarning):
    """Programs run with partial isolation (bwrap is not available)."""


@dataclass(frozen=True)
class Isolation:
    """The isolation a sandbox runs with: `name` is "bwrap" or "partial"."""

    name: str


def check_isolation(setting: str) -> str:
    """`setting` if it is one of ISOLATION_SETTINGS; IsolationError otherwise."""
    if setting not in ISOLATION_SETTINGS:
        raise IsolationError(f"unknown isolation {setting!r}; expected one of "
                             f"{', '.join(ISOLATION_SETTINGS)}")
    return setting


def _bind_arguments() -> list[str]:
    """bwrap's read-only binds of what the Python interpreter needs."""
    arguments = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            arguments += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            arguments += ["--ro-bind", top, top]
    arguments += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    prefixes = {os.path.realpath(path) for path in (
        sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    for prefix in sorted(prefixes):
        if prefix != "/" and not prefix.startswith("/usr/"):
            arguments += ["--ro-bind", prefix, prefix]
            if os.path.realpath(sys.prefix) == prefix and sys.prefix != prefix:
                arguments += ["--symlink", prefix, sys.prefix]
    # TAPE itself stays importable (a program made by `tape tune` calls tape.api), read-only,
    # but its synthetic trace generator is masked: with the seed (0 by default) a program could
    # regenerate the very windows it is scored on.
    package = os.path.dirname(os.path.abspath(__file__))  # this module's package, tape
    real = os.path.realpath(package)
    if not any(real.startswith(prefix.rstrip("/") + "/") for prefix in (*prefixes, "/usr")):
        arguments += ["--ro-bind", real, package]
    masked = [os.path.join(package, "synthetic.py"),
              *glob.glob(os.path.join(package, "__pycache__", "synthetic.*.pyc"))]
    for path in masked:
        if os.path.isfile(path):
            arguments += ["--ro-bind", "/dev/null", path]
    return arguments


@cache
def _tmpfs_size_option() -> bool:
    """Whether this bwrap takes `--size` (bubblewrap 0.7 and later)."""
    try:
        result = subprocess.run([shutil.which("bwrap") or "bwrap", "--help"], text=True,
                                capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--size" in result.stdout + result.stderr


_NOBODY = ["--unshare-user", "--uid", "65534", "--gid", "65534"]
"""Run as nobody in a user namespace of its own: for an evaluator running as root."""


def _bwrap_arguments(memory_mb: int, as_nobody: bool | None = None) -> list[str]:
    """bwrap's options before the command; `as_nobody` (default: where it works, for root)
    adds `_NOBODY`. Every capability is dropped: bwrap started by root would leave them all."""
    size = ["--size", str(memory_mb * 2**20)] if _tmpfs_size_option() else []
    nobody = _NOBODY if (_nobody_works() if as_nobody is None else as_nobody) else []
    return [
        "--unshare-all", *nobody, "--cap-drop", "ALL", "--die-with-parent", "--new-session",
        *_bind_arguments(),
        "--proc", "/proc", "--dev", "/dev", *size, "--tmpfs", "/tmp",
        "--dir", SANDBOX_FOLDER, "--chdir", "/tmp", "--clearenv", "--setenv", "HOME", "/tmp",
        "--setenv", "TMPDIR", "/tmp", "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
        "--setenv", "LANG", "C.UTF-8",
    ]


@cache
def _try_bwrap(as_nobody: bool) -> str | None:
    """Why a sandbox that imports numpy does not run, or None when it does (tried once per
    process and user: a try takes a fifth of a second)."""
    try:
        result = subprocess.run(
            [shutil.which("bwrap") or "bwrap", *_bwrap_arguments(64, as_nobody),
             sys.executable, "-I", "-c", "import numpy"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60, text=True, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bwrap does not start: {error}"
    if result.returncode != 0:
        lines = (result.stderr or "").strip().splitlines()
        return f"bwrap does not start: {lines[-1] if lines else f'exit code {result.returncode}'}"
    return None


@cache
def _nobody_works() -> bool:
    """Whether the sandbox can run as nobody: tried where this process runs as root."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and _try_bwrap(True) is None


@cache
def bwrap_failure() -> str | None:
    """Why bwrap cannot run a sandbox here, or None when it can (tried once per process)."""
    if not sys.platform.startswith("linux"):
        return f"bwrap needs Linux, this is {sys.platform}"
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    return _try_bwrap(_nobody_works())


_warned = False


def resolve_isolation(setting: str = "auto") -> Isolation:
    """The isolation `setting` gives on this machine.

    `auto` falls back to partial isolation with an `IsolationWarning` (once per process) that
    says what is not isolated and how to get full isolation.

    Raises:
        IsolationError: an unknown setting, or `strict` where bwrap cannot run.
    """
    global _warned
    check_isolation(setting)
    if setting == "partial":
        return Isolation("partial")
    failure = bwrap_failure()
    if failure is None:
        return Isolation("bwrap")
    if setting == "strict":
        raise IsolationError(f"isolation strict cannot run: {failure}; {_INSTALL_HINT}, or "
                             "choose isolation auto or partial")
    if not _warned:
        _warned = True
        warnings.warn(_PARTIAL_NOTE.format(why=failure), IsolationWarning, stacklevel=2)
    return Isolation("partial")


def sandbox_command(isolation: Isolation, child_script: Path, program: Path, memory_mb: int,
                    workdir: Path) -> list[str]:
    """The command line that runs `child_script` on `program`.

    `workdir` is a private empty folder: under partial isolation the child's working and
    temporary folder, holding its copy of the child script (so that no module beside the
    script can shadow the standard library's); the child is told this process's id, to die
    with it (`PR_SET_PDEATHSIG`).
    """
    python = sys.executable
    if isolation.name == "bwrap":
        script = f"{SANDBOX_FOLDER}/child.py"
        command = [shutil.which("bwrap") or "bwrap", *_bwrap_arguments(memory_mb),
                   "--ro-bind", str(child_script), script,
                   "--ro-bind", str(program), f"{SANDBOX_FOLDER}/program.py",
                   python, "-I", "-B", script, f"{SANDBOX_FOLDER}/program.py", str(memory_mb)]
        return command
    copy = workdir / "child.py"
    shutil.copyfile(child_script, copy)
    return [python, "-I", "-B", str(copy), str(program), str(memory_mb), str(os.getpid())]


def partial_environment(workdir: Path) -> dict[str, str]:
    """The child's whole environment under partial isolation: nothing of the evaluator's."""
    return {"HOME": str(workdir), "TMPDIR": str(workdir), "PATH": os.defpath,
            "LANG": "C.UTF-8"}


def _process_table() -> list[tuple[int, int, int, int]]:
    """(pid, parent pid, process group, session) of every process, from /proc (Linux)."""
    table = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table.append((int(entry), int(fields[1]), int(fields[2]), int(fields[3])))
    return table


def _tree(root: int) -> set[int]:
    """`root`, its descendants, and every process of the session or group `root` leads."""
    table = _process_table()
    found = {pid for pid, _, group, session in table if root in (group, session)} | {root}
    grew = True
    while grew:
        more = {pid for pid, parent, _, _ in table if parent in found} - found
        found |= more
        grew = bool(more)
    return found - {os.getpid()}


def kill_process_tree(root: int) -> None:
    """SIGKILL `root` (a child started in its own session), what it started and its session.

    On Linux the tree is first stopped (SIGSTOP, repeated until no new process appears) so that
    nothing forks away while it is killed; elsewhere its process group is killed.
    """
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(root, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, AttributeError):
            pass
        return
    stopped: set[int] = set()
    for _ in range(100):
        tree = _tree(root) - stopped
        if not tree:
            break
        for pid in tree:
            try:
                os.kill(pid, signal.SIGSTOP)
            except (ProcessLookupError, PermissionError):
                pass
        stopped |= tree
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
