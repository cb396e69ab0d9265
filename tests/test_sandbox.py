"""The sandbox contains programs that hang, eat memory, raise, return garbage, snoop or attack.

Every test runs on both isolation paths: bwrap (skipped where it cannot run) and partial.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tape.errors import ProgramError
from tape.isolation import bwrap_failure
from tape.layout import Layout
from tape.sandbox import SandboxedProgram

LAYOUT = Layout(num_replicas=12, num_groups=2, num_nodes=2, num_gpus=4)
NUM_LAYERS, NUM_EXPERTS = 3, 8

# A correct program: expert e in slot e, then the hottest experts copied into the spare slots.
GOOD = """
import numpy as np

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    weight = np.asarray(weight, dtype=float)
    layers, experts = weight.shape
    spare = num_replicas - experts
    hottest = np.argsort(-weight, axis=1, kind="stable")[:, :spare]
    phy2log = np.concatenate([np.tile(np.arange(experts), (layers, 1)), hottest], axis=1)
    logcnt = np.ones((layers, experts), dtype=np.int64)
    log2phy = np.full((layers, experts, 2), -1, dtype=np.int64)
    log2phy[:, :, 0] = np.arange(experts)
    for layer in range(layers):
        for offset, expert in enumerate(hottest[layer]):
            logcnt[layer, expert] += 1
            log2phy[layer, expert, 1] = experts + offset
    return phy2log, log2phy, logcnt
"""


ISOLATION = {"setting": "partial"}


@pytest.fixture(autouse=True, params=["bwrap", "partial"])
def isolation(request) -> str:
    """Each test once under bwrap (isolation strict) and once under partial isolation."""
    if request.param == "bwrap":
        if bwrap_failure() is not None:
            pytest.skip(f"bwrap cannot run here: {bwrap_failure()}")
        ISOLATION["setting"] = "strict"
    else:
        ISOLATION["setting"] = "partial"
    return request.param


def sandbox(path, **options) -> SandboxedProgram:
    """A SandboxedProgram under the isolation of the running test."""
    return SandboxedProgram(path, isolation=ISOLATION["setting"], **options)


def write(tmp_path, body: str, name: str = "program.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def window(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((NUM_LAYERS, NUM_EXPERTS)) * 100


def assert_fails(program: SandboxedProgram, weight: np.ndarray, reason: str) -> None:
    """`program.call(weight)` raises ProgramError matching `reason`; the child is then stopped."""
    with program, pytest.raises(ProgramError, match=reason):
        program.call(weight, LAYOUT)


def process_gone(pid: int) -> bool:
    """No process `pid`, or only its zombie (a killed orphan waits for init to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def expected_good_phy2log(weight: np.ndarray) -> np.ndarray:
    """The GOOD program's phy2log worked out directly: identity, then the 4 hottest experts."""
    rows = []
    for layer in range(NUM_LAYERS):
        order = sorted(range(NUM_EXPERTS), key=lambda expert: (-weight[layer, expert], expert))
        rows.append(list(range(NUM_EXPERTS)) + order[:4])
    return np.array(rows)


def test_a_correct_program_runs_and_reuses_one_child(tmp_path):
    path = write(tmp_path, GOOD)
    with sandbox(path, timeout_s=20) as program:
        first, seconds = program.call(window(0), LAYOUT)
        pid = program.pid
        second, _ = program.call(window(1), LAYOUT)
        assert program.pid == pid
    assert program.pid is None and process_gone(pid)
    np.testing.assert_array_equal(first.phy2log, expected_good_phy2log(window(0)))
    np.testing.assert_array_equal(second.phy2log, expected_good_phy2log(window(1)))
    assert first.logcnt.sum(axis=1).tolist() == [12] * NUM_LAYERS
    assert 0 < seconds < 5
    assert not (tmp_path / "__pycache__").exists()  # nothing written beside the program


def test_a_program_that_sleeps_forever_is_killed_within_the_timeout(tmp_path):
    path = write(
        tmp_path,
        GOOD.replace(
            "    weight = np.asarray(weight, dtype=float)\n",
            "    weight = np.asarray(weight, dtype=float)\n"
            "    if weight[0, 0] < 0:\n"
            "        import time\n"
            "        while True:\n"
            "            time.sleep(1)\n",
        ),
    )
    stuck = window(0)
    stuck[0, 0] = -1
    with sandbox(path, timeout_s=1.0) as program:
        program.call(window(0), LAYOUT)
        pid = program.pid
        start = time.monotonic()
        with pytest.raises(ProgramError, match=r"timed out after 1 s; its process was killed"):
            program.call(stuck, LAYOUT)
        assert time.monotonic() - start < 4
        assert process_gone(pid)
        placement, _ = program.call(window(1), LAYOUT)  # a fresh child takes over
        assert program.pid != pid
        np.testing.assert_array_equal(placement.phy2log, expected_good_phy2log(window(1)))


def marked_processes(marker: str) -> list[int]:
    """The live (not zombie) processes whose command line holds `marker`, seen from here."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if marker.encode() in cmdline.read() and not process_gone(int(entry)):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def wait_until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


# Starts a grandchild in a session of its own (it leaves the child's process group) and a
# plain one, both carrying MARKER on their command lines, then hangs.
DETACHING = """
import subprocess, sys, time

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "MARKER"]
    subprocess.Popen(sleeper, start_new_session=True)
    subprocess.Popen(sleeper)
    time.sleep(60)
"""


def test_processes_a_program_starts_die_with_it_even_in_a_session_of_their_own(tmp_path):
    # A pool of workers or a subprocess would otherwise outlive the child the timeout killed.
    marker = f"tape-test-{os.getpid()}-{time.monotonic_ns()}"
    path = write(tmp_path, DETACHING.replace("MARKER", marker))
    with sandbox(path, timeout_s=2.0) as program, pytest.raises(ProgramError, match="timed out"):
        program.call(window(), LAYOUT)
    assert wait_until(lambda: not marked_processes(marker)), marked_processes(marker)


def test_the_child_is_outside_the_callers_session(tmp_path):
    # A Ctrl-C at the terminal reaches the terminal's foreground group, not the child (which
    # could die with a traceback on the terminal while it starts).
    with sandbox(write(tmp_path, GOOD), timeout_s=20) as program:
        program.call(window(), LAYOUT)
        assert os.getsid(program.pid) == program.pid != os.getsid(0)


def test_output_that_bypasses_sys_stdout_does_not_reach_the_terminal(tmp_path, capfd):
    path = write(tmp_path, "import os\n" + GOOD.replace(
        "    weight = np.asarray(weight, dtype=float)\n",
        "    weight = np.asarray(weight, dtype=float)\n"
        "    os.write(1, b'LEAKED-BY-FD\\n')\n"
        "    os.system('echo LEAKED-BY-SHELL; echo LEAKED-TO-STDERR >&2')\n",
    ))
    with sandbox(path, timeout_s=20) as program:
        program.call(window(), LAYOUT)
    captured = capfd.readouterr()
    assert "LEAKED" not in captured.out + captured.err


def test_a_program_that_hangs_at_import_is_killed(tmp_path):
    path = write(tmp_path, "while True:\n    pass\n" + GOOD)
    start = time.monotonic()
    assert_fails(
        sandbox(path, timeout_s=1.0), window(), "importing the program timed out after 1 s"
    )
    assert time.monotonic() - start < 30


def test_a_program_that_eats_memory_is_contained(tmp_path):
    path = write(
        tmp_path,
        """
        import numpy as np

        def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
            hoard = []
            while True:
                hoard.append(np.ones(2**24))  # 128 MiB at a time, touched
        """,
    )
    program = sandbox(path, timeout_s=30, memory_mb=300)
    assert_fails(program, window(),
                 "rebalance_experts raised MemoryError: it exceeded the memory limit of 300 MB")


def failure_reason(tmp_path, body: str) -> str:
    """The one-line reason of the ProgramError that one call of the program `body` raises."""
    with sandbox(write(tmp_path, body), timeout_s=20) as program, \
            pytest.raises(ProgramError) as caught:
        program.call(window(), LAYOUT)
    return str(caught.value)


def test_a_program_that_raises_reports_the_error_and_its_line(tmp_path):
    message = failure_reason(tmp_path, """
        def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
            print("about to fail")
            raise ValueError("no placement for you")
        """)
    assert "rebalance_experts raised ValueError: no placement for you (line 4 of the program)" in (
        message
    )
    assert "about to fail" in message and "\n" not in message


IDENTITY_MAPS = """
import numpy as np

def maps(layers, experts, num_replicas):
    phy2log = np.tile(np.arange(num_replicas) % experts, (layers, 1))
    logcnt = np.zeros((layers, experts), dtype=np.int64)
    log2phy = np.full((layers, experts, 2), -1, dtype=np.int64)
    for slot in range(num_replicas):
        expert = slot % experts
        log2phy[:, expert, logcnt[0, expert]] = slot
        logcnt[:, expert] += 1
    return phy2log, log2phy, logcnt
"""


@pytest.mark.parametrize(
    ("returned", "reason"),
    [
        ("None", "returned a NoneType, expected a tuple"),
        ("(phy2log, logcnt)", "returned a tuple of length 2"),
        (
            "(phy2log[:, :-1], log2phy, logcnt)",
            r"phy2log has shape \(3, 11\), expected \(3, 12\)",
        ),
        ("(phy2log, log2phy, logcnt[:, :4])", r"logcnt has shape \(3, 4\), expected \(3, 8\)"),
        ("(phy2log + 0.5, log2phy, logcnt)", "phy2log must hold integers"),
        ("(phy2log, log2phy, 'many')", "logcnt must hold integers"),
        ("(phy2log, log2phy, logcnt + 1)", r"invalid placement: logcnt\[0, 0\] = 3"),
        (
            "(np.zeros_like(phy2log), log2phy, logcnt)",
            "invalid placement: expert 1 of layer 0 has no replica",
        ),
        (
            "(phy2log, log2phy[:, [1, 0, 2, 3, 4, 5, 6, 7]], logcnt)",
            "invalid placement: log2phy puts expert 0 of layer 0 in slot 1",
        ),
    ],
)
def test_garbage_outputs_are_rejected_with_the_reason(tmp_path, returned, reason):
    path = write(
        tmp_path,
        IDENTITY_MAPS
        + "\ndef rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):\n"
        + "    phy2log, log2phy, logcnt = maps(*weight.shape, num_replicas)\n"
        + f"    return {returned}\n",
    )
    assert_fails(sandbox(path, timeout_s=20), window(), reason)


SNOOP = """
import gc
import sys

import numpy as np

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    seen = []
    frame = sys._getframe()
    while frame is not None:
        seen.extend(frame.f_locals.values())
        seen.extend(frame.f_globals.values())
        frame = frame.f_back
    seen.extend(gc.get_objects())
    arrays = [value for value in seen if isinstance(value, np.ndarray)]
    if any(array.dtype.kind == "f" and np.any(array == 7777.0) for array in arrays):
        raise RuntimeError("found a later window")
    print("searched", len(arrays), "arrays")
    return good(weight, num_replicas, num_groups, num_nodes, num_gpus)
"""


def test_a_program_that_inspects_its_callers_finds_no_other_window(tmp_path):
    path = write(tmp_path, GOOD.replace("def rebalance_experts", "def good") + SNOOP)
    windows = np.stack([window(0), np.full((NUM_LAYERS, NUM_EXPERTS), 7777.0)])
    with sandbox(path, timeout_s=20) as program:
        placement, _ = program.call(windows[0], LAYOUT)
    np.testing.assert_array_equal(placement.phy2log, expected_good_phy2log(windows[0]))
    # The same search does find the marked window when it is the one passed in: the probe works.
    assert_fails(sandbox(path, timeout_s=20), windows[1], "found a later window")


def test_nothing_of_the_evaluators_environment_reaches_the_child(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("TAPE_WINDOWS", str(tmp_path / "windows.npz"))  # every window scored on
    monkeypatch.setenv("PLAIN_VARIABLE", "yes")
    path = write(
        tmp_path,
        "import os\n"
        "assert 'OPENAI_API_KEY' not in os.environ, 'key leaked'\n"
        "assert 'TAPE_WINDOWS' not in os.environ, 'the windows file leaked'\n"
        "assert 'PLAIN_VARIABLE' not in os.environ, 'the environment leaked'\n" + GOOD,
    )
    with sandbox(path, timeout_s=20) as program:
        program.call(window(), LAYOUT)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("def rebalance_experts(:\n    pass\n", "syntax error in the program, line 1"),
        ("def something_else():\n    pass\n", "defines no function `rebalance_experts`"),
        # The torch extra, not a bare pin of one torch version.
        (
            "import torch\n",
            (
                r"imports torch, which is not installed: .* `pip install -e '\.\[torch\]'` in "
                r"a checkout of TAPE \(a CPU build"
            ),
        ),
        ("import no_such_module_here\n", "imports a missing module: no_such_module_here"),
        ("raise KeyError('at import')\n", "importing the program failed: KeyError: 'at import'"),
    ],
)
def test_programs_that_cannot_load_are_rejected(tmp_path, body, reason):
    if body.startswith("import torch") and importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here")
    path = write(tmp_path, body)
    assert_fails(sandbox(path, timeout_s=20), window(), reason)


def test_a_missing_file_is_rejected(tmp_path):
    with pytest.raises(ProgramError, match="does not exist"):
        sandbox(tmp_path / "absent.py").call(window(), LAYOUT)


@pytest.mark.parametrize(
    ("exit_line", "reason"),
    [
        ("import sys; sys.exit(3)", "rebalance_experts raised SystemExit: 3"),
        ("import os; os._exit(3)", r"exited unexpectedly \(exit code 3\)"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "died from signal SIGKILL"),
    ],
)
def test_a_program_that_exits_or_dies_is_reported(tmp_path, exit_line, reason):
    path = write(
        tmp_path,
        f"def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):\n"
        f"    {exit_line}\n",
    )
    assert_fails(sandbox(path, timeout_s=20), window(), reason)


TORCH_PROGRAM = """
import torch

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    assert isinstance(weight, torch.Tensor) and weight.dtype == torch.float64, type(weight)
    layers, experts = weight.shape
    phy2log = torch.arange(num_replicas).remainder(experts).repeat(layers, 1)
    logcnt = torch.stack([torch.bincount(row, minlength=experts) for row in phy2log])
    log2phy = torch.full((layers, experts, int(logcnt.max())), -1, dtype=torch.int64)
    for slot in range(num_replicas):
        expert = slot % experts
        log2phy[:, expert, slot // experts] = slot
    return phy2log, log2phy, logcnt
"""


def test_a_torch_program_gets_a_float64_tensor_and_may_return_tensors(tmp_path):
    pytest.importorskip("torch")
    path = write(tmp_path, TORCH_PROGRAM)
    with sandbox(path, timeout_s=60) as program:
        placement, _ = program.call(window(), LAYOUT)
    expected = np.tile(np.arange(12) % NUM_EXPERTS, (NUM_LAYERS, 1))
    np.testing.assert_array_equal(placement.phy2log, expected)
    assert placement.logcnt[:, :4].tolist() == [[2] * 4] * NUM_LAYERS


def test_a_multi_line_error_message_arrives_on_one_line(tmp_path):
    path = write(
        tmp_path,
        "def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):\n"
        "    raise ValueError('first line\\nsecond line')\n",
    )
    assert_fails(sandbox(path, timeout_s=20), window(),
                 "raised ValueError: first line second line")


def test_a_signal_another_thread_receives_stops_a_wait_for_the_child(tmp_path):
    # The kernel may hand SIGHUP to any thread; the main thread, waiting for the child's reply,
    # must still run the handler (which ends the command) within a poll slice, not at the
    # call's timeout (30 s here). CI once saw `tape compare` ignore SIGHUP for over 60 s.
    script = tmp_path / "waiter.py"
    script.write_text(textwrap.dedent("""
        import os, select, signal, sys, threading, time
        from tape.sandbox import _ready

        def ended(signum, frame):
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGHUP, ended)
        read_end, _ = os.pipe()  # never written: the wait lasts until the deadline
        helper = threading.Thread(target=lambda: (
            time.sleep(0.5), signal.pthread_kill(threading.get_ident(), signal.SIGHUP)))
        helper.start()
        deadline = time.perf_counter() + 30
        while not _ready(read_end, select.POLLIN, deadline):
            pass
    """))
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], check=False, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 129, done.stderr
    assert time.monotonic() - start < 10
