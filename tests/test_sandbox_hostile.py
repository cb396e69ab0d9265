"""Programs written to attack the evaluator: each hostile class, on both isolation paths.

Peeking at the parent through procfs, payloads on the reply channel, forged clocks, processes
that leave the child's session and outlive a killed evaluator, escape sequences in reasons, and
programs that spend the whole time budget. The fixtures and helpers are `test_sandbox`'s.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_sandbox import (  # noqa: F401 - `isolation` is the autouse fixture of both files
    DETACHING,
    GOOD,
    LAYOUT,
    assert_fails,
    expected_good_phy2log,
    failure_reason,
    isolation,
    marked_processes,
    sandbox,
    wait_until,
    window,
    write,
)

from tape.errors import ProgramError
from tape.sandbox import clean_reason

SECRET = "sk-hostile-test-secret-0123456789"

# Looks through every process's command line, environment and working folder for MARKER, and
# for the files in PATHS; raises with what it found (and the secret, if it found it).
PEEK = GOOD.replace("def rebalance_experts", "def good") + """
import os

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    found = []
    for entry in os.listdir("/proc"):
        for name in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry}/{name}", "rb") as file:
                    data = file.read()
            except OSError:
                continue
            if b"MARKER" in data:
                found.append(f"{entry}/{name}")
            if b"SECRET" in data:
                found.append("the secret SECRET")
        try:
            if "MARKER" in os.readlink(f"/proc/{entry}/cwd"):
                found.append(f"{entry}/cwd")
        except OSError:
            pass
    for path in PATHS:
        if os.path.exists(path):
            found.append(path)
    try:
        from tape.synthetic import synthetic_trace  # noqa: F401 - would regenerate the windows
        found.append("tape's synthetic trace")
    except ImportError:
        pass
    if found:
        raise RuntimeError("found " + ", ".join(sorted(set(found))))
    return good(weight, num_replicas, num_groups, num_nodes, num_gpus)
"""

# An evaluator in a process of its own: scores one program (argv: program, isolation), with
# a command line, working folder and environment that a peeking program could look for.
EVALUATOR = """
import json, sys
sys.path.insert(0, TESTS)
from test_sandbox import LAYOUT, window
from tape.errors import ProgramError
from tape.sandbox import SandboxedProgram

with SandboxedProgram(sys.argv[1], timeout_s=120, isolation=sys.argv[2]) as program:
    try:
        placement, seconds = program.call(window(), LAYOUT)
        print(json.dumps({"ok": True}), flush=True)
    except ProgramError as error:
        print(json.dumps({"ok": False, "reason": str(error)}), flush=True)
"""


def start_evaluator(tmp_path: Path, program: str, marker: str) -> subprocess.Popen:
    folder = tmp_path / marker
    folder.mkdir(exist_ok=True)
    script = folder / "evaluator.py"
    script.write_text(EVALUATOR.replace("TESTS", repr(str(Path(__file__).parent))))
    environment = {**os.environ, "OPENAI_API_KEY": SECRET,
                   "TAPE_WINDOWS": str(folder / "windows.npz")}
    setting = "strict" if isolation_now() == "bwrap" else "partial"
    return subprocess.Popen([sys.executable, str(script), program, setting, marker],
                            cwd=folder, env=environment, stdout=subprocess.PIPE, text=True)


def isolation_now() -> str:
    from test_sandbox import ISOLATION

    return "bwrap" if ISOLATION["setting"] == "strict" else "partial"


def test_a_program_peeking_through_procfs_finds_nothing_under_bwrap_and_no_secret_leaks(tmp_path):
    marker = f"tape-peek-{os.getpid()}"
    windows = tmp_path / marker / "windows.npz"
    windows.parent.mkdir()
    np.savez(windows, windows=np.zeros((2, 2)))
    body = (PEEK.replace("MARKER", marker).replace("SECRET", SECRET)
            .replace("PATHS", repr([str(windows), str(tmp_path), __file__])))
    program = write(tmp_path, body)
    evaluator = start_evaluator(tmp_path, program, marker)
    output, _ = evaluator.communicate(timeout=120)
    result = json.loads(output)
    if isolation_now() == "bwrap":
        assert result == {"ok": True}
    else:
        # Partial isolation: the program does see the evaluator (the warning says so), but the
        # secret never leaves in the failure reason.
        assert not result["ok"] and "found" in result["reason"]
        assert SECRET not in result["reason"] and "***" in result["reason"]


def frame(header: dict, payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack(">I", len(text)) + text + payload


class Exploit:
    """Unpickled, writes a file: proof that the evaluator ran the program's code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def hostile_payloads(proof: str) -> dict[str, bytes]:
    return {
        "a pickle": pickle.dumps(("ok", Exploit(proof))),
        "a pickle after a valid length": struct.pack(">I", 40) + pickle.dumps(Exploit(proof)),
        "an object dtype": frame({"kind": "ok", "id": "x", "arrays": [
            {"dtype": "|O", "shape": [3, 12]}] * 3}, pickle.dumps(Exploit(proof))),
        "an array of 10**18 elements": frame({"kind": "ok", "id": "x", "arrays": [
            {"dtype": "<i8", "shape": [10**9, 10**9]}] * 3}),
        "a huge header": struct.pack(">I", 2**31),
        "not JSON": struct.pack(">I", 5) + b"\xff\xfe{[(",
    }


PAYLOAD_WRITER = """
import os

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    for descriptor in range(3, 64):
        try:
            os.write(descriptor, PAYLOAD)
        except OSError:
            pass
    import time
    time.sleep(30)
"""


@pytest.mark.parametrize("kind", list(hostile_payloads("x")))
def test_a_payload_on_the_reply_channel_is_a_malformed_reply_never_code(tmp_path, kind):
    proof = tmp_path / "pwned"
    payload = hostile_payloads(str(proof))[kind]
    path = write(tmp_path, PAYLOAD_WRITER.replace("PAYLOAD", repr(payload)))
    start = time.monotonic()
    assert_fails(sandbox(path, timeout_s=20), window(), "sent a malformed reply")
    assert time.monotonic() - start < 15  # refused on sight, not after the timeout
    assert not proof.exists()


def test_a_forged_reply_sent_ahead_of_a_call_is_refused(tmp_path):
    # A reply written by a thread after the program returned waits in the channel for the
    # next call, which would then take no time at all.
    forged = frame({"kind": "ok", "id": "guess", "arrays": [
        {"dtype": "<i8", "shape": [3, 12]}, {"dtype": "<i8", "shape": [3, 8, 2]},
        {"dtype": "<i8", "shape": [3, 8]}]}, b"\0" * 8 * (36 + 48 + 24))
    body = GOOD.replace("def rebalance_experts", "def good") + f"""
import os, threading, time

def forge():
    time.sleep(0.2)
    for descriptor in range(3, 64):
        try:
            os.write(descriptor, {forged!r})
        except OSError:
            pass

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    threading.Thread(target=forge).start()
    return good(weight, num_replicas, num_groups, num_nodes, num_gpus)
"""
    with sandbox(write(tmp_path, body), timeout_s=20) as program:
        program.call(window(0), LAYOUT)
        time.sleep(0.5)
        with pytest.raises(ProgramError, match="reply channel outside a call"):
            program.call(window(1), LAYOUT)


FORGED_CLOCK = GOOD.replace("def rebalance_experts", "def good") + """
import time

for name in ("perf_counter", "monotonic", "time", "process_time", "thread_time"):
    setattr(time, name, lambda: 0.0)
    setattr(time, name + "_ns", lambda: 0)

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    for name in ("perf_counter", "monotonic", "time"):
        setattr(time, name, lambda: 0.0)
    time.sleep(0.3)
    return good(weight, num_replicas, num_groups, num_nodes, num_gpus)
"""


def test_a_program_that_forges_the_clock_is_timed_from_outside(tmp_path):
    with sandbox(write(tmp_path, FORGED_CLOCK), timeout_s=20) as program:
        placement, seconds = program.call(window(), LAYOUT)
    np.testing.assert_array_equal(placement.phy2log, expected_good_phy2log(window()))
    assert 0.3 <= seconds < 5


def test_escape_sequences_and_control_characters_never_reach_the_reason(tmp_path):
    message = "\\x1b[2J\\x1b]0;owned\\x07\\x1b[31mred\\x1b[0m\\x9b1m\\u202e\\x00\\rplain" + "x" * 2000
    reason = failure_reason(tmp_path, f"""
        def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
            print("\\x1b]52;c;c2VjcmV0\\x07")
            raise ValueError("{message}")
    """)
    assert "red" in reason and "plain" in reason
    assert all(character.isprintable() for character in reason), repr(reason)
    assert "owned" not in reason and "c2VjcmV0" not in reason
    assert len(reason) <= 500


def test_clean_reason_masks_the_evaluators_secrets(monkeypatch):
    monkeypatch.setenv("SOME_API_TOKEN", SECRET)
    assert clean_reason(f"it said {SECRET}!") == "it said ***!"


def test_a_program_past_its_time_budget_fails_with_that_reason(tmp_path):
    body = GOOD.replace("def rebalance_experts", "def good") + """
import time

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    time.sleep(0.4)
    return good(weight, num_replicas, num_groups, num_nodes, num_gpus)
"""
    start = time.monotonic()
    with sandbox(write(tmp_path, body), timeout_s=1.0, budget_s=1.0) as program:
        program.call(window(0), LAYOUT)
        program.call(window(1), LAYOUT)
        with pytest.raises(ProgramError, match="ran past its time budget of 1 s over all calls"):
            program.call(window(2), LAYOUT)
        with pytest.raises(ProgramError, match="time budget"):  # and every call after it
            program.call(window(3), LAYOUT)
    assert time.monotonic() - start < 6


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGHUP])
def test_the_programs_processes_die_with_the_evaluator(tmp_path, signal_number):
    marker = f"tape-orphan-{os.getpid()}-{int(signal_number)}-{time.monotonic_ns()}"
    path = write(tmp_path, DETACHING.replace("MARKER", marker))
    evaluator = start_evaluator(tmp_path, path, "evaluator")
    try:
        assert wait_until(lambda: len(marked_processes(marker)) == 2, 60), "no grandchildren"
        child = marked_processes(path)  # the child (bwrap's: their command lines name it)
        assert child
        evaluator.send_signal(signal_number)
        evaluator.wait(timeout=30)
        if isolation_now() == "bwrap":
            # the whole PID namespace goes: the grandchild in its own session included
            assert wait_until(lambda: not marked_processes(marker)), marked_processes(marker)
        else:
            # partial isolation: the child dies with its parent (grandchildren may not)
            assert wait_until(lambda: not set(child) & set(marked_processes(path)))
    finally:
        for pid in marked_processes(marker):
            os.kill(pid, signal.SIGKILL)
        evaluator.kill()


PRIVILEGES = GOOD.replace("def rebalance_experts", "def good") + """
import os, sys

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    with open("/proc/self/status") as status:
        capabilities = [line.split()[1] for line in status if line.startswith("CapEff")]
    assert capabilities == ["0000000000000000"], capabilities
    for path in (__file__, os.path.join(sys.prefix, "tape-was-here"), "/usr/tape-was-here"):
        try:
            with open(path, "a"):
                pass
        except OSError:
            continue
        raise RuntimeError(f"wrote {path}")
    with open("/tmp/scratch", "w") as scratch:  # the private tmpfs is writable
        scratch.write("ok")
    return good(weight, num_replicas, num_groups, num_nodes, num_gpus)
"""


def test_under_bwrap_a_program_has_no_capabilities_and_writes_only_its_tmpfs(tmp_path):
    if isolation_now() != "bwrap":
        pytest.skip("partial isolation does not drop what the evaluator may do")
    with sandbox(write(tmp_path, PRIVILEGES), timeout_s=20) as program:
        placement, _ = program.call(window(), LAYOUT)
    np.testing.assert_array_equal(placement.phy2log, expected_good_phy2log(window()))
    assert not (Path(sys.prefix) / "tape-was-here").exists()


def test_under_bwrap_a_program_reaches_no_network(tmp_path):
    import socket

    if isolation_now() != "bwrap":
        pytest.skip("partial isolation leaves the network reachable (its warning says so)")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    body = GOOD.replace("def rebalance_experts", "def good") + f"""
import socket

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    except OSError:
        return good(weight, num_replicas, num_groups, num_nodes, num_gpus)
    raise RuntimeError("reached the evaluator's machine")
"""
    try:
        with sandbox(write(tmp_path, body), timeout_s=20) as program:
            placement, _ = program.call(window(), LAYOUT)  # raises if the server was reached
        assert placement.num_slots == LAYOUT.num_replicas
    finally:
        server.close()
