"""--out: one run at a time, staging left by killed runs removed, an empty path refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import SMALL_LAYOUT
from test_cli import runner
from test_sandbox import marked_processes, wait_until

from tape.cli import app
from tape.cli.out_lock import lock_path, out_lock


def compare(out, trace, *extra):
    return runner.invoke(app, ["compare", "--trace", str(trace), "--interval", "10",
                               "--policies", "vanilla", "--out", str(out), *SMALL_LAYOUT, *extra])


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path, small_trace):
    out = tmp_path / "results"
    with out_lock(out):  # a first run, still writing
        result = compare(out, small_trace)
        assert result.exit_code == 2
        assert f"being written by another tape run (process {os.getpid()})" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert not lock_path(out).exists()  # released on exit
    assert compare(out, small_trace).exit_code == 0  # and free again


def test_a_killed_runs_lock_and_staging_are_taken_over(tmp_path, small_trace):
    out = tmp_path / "results"
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import sys, time; from pathlib import Path; "
                                "from tape.cli.out_lock import out_lock\n"
                                f"with out_lock(Path({str(out)!r})):\n"
                                "    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert compare(out, small_trace).exit_code == 2  # a live holder
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(out).exists()  # left behind by the killed run
    out.mkdir()
    inside = out / ".staging-0123456789ab"
    beside = tmp_path / ".results.staging-0123456789ab"
    for folder in (inside, beside):
        folder.mkdir()
        (folder / "partial.json").write_text("{}")
    result = compare(out, small_trace)
    assert result.exit_code == 0, result.output
    assert not inside.exists() and not beside.exists()
    assert json.loads((out / "manifest.json").read_text())["command"] == "compare"
    assert not lock_path(out).exists()


@pytest.mark.parametrize("command", ["compare", "evaluate-dir", "evolve", "tune"])
@pytest.mark.parametrize("blank", ["", "   "])
def test_an_empty_or_blank_out_is_refused_by_every_command(tmp_path, small_trace, good_program,
                                                          command, blank, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = [str(good_program.parent)] if command == "evaluate-dir" else []
    before = sorted(os.listdir(tmp_path))
    result = runner.invoke(app, [command, *extra, "--trace", str(small_trace), "--out", blank])
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and "empty path" in result.output
    assert sorted(os.listdir(tmp_path)) == before


def test_sighup_leaves_no_staging_lock_or_program_behind(tmp_path, small_trace):
    # A closed terminal (SIGHUP) ends the command as SIGTERM does: cleanly.
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\ndef rebalance_experts(*arguments):\n    time.sleep(60)\n")
    out = tmp_path / "results"
    command = subprocess.Popen(
        [sys.executable, "-c", "from tape.cli import main; main()", "compare", "--trace",
         str(small_trace), "--interval", "10", "--policies", "vanilla", "--program",
         str(sleeper), "--timeout", "100", "--out", str(out), *SMALL_LAYOUT],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".results.staging-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert wait_until(lambda: bool(marked_processes(str(sleeper))), 30)  # the program runs
    command.send_signal(signal.SIGHUP)
    _, errors = command.communicate(timeout=60)
    assert command.returncode == 128 + signal.SIGHUP, errors
    assert "Traceback" not in errors
    assert not list(tmp_path.glob(".results*")) and not out.exists()
    assert wait_until(lambda: not marked_processes(str(sleeper)))


def test_without_flock_the_pid_in_the_lock_file_decides(tmp_path, monkeypatch):
    import errno

    from tape.cli import out_lock as module
    from tape.errors import ConfigError

    def no_flock(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(module.fcntl, "flock", no_flock)
    out = tmp_path / "results"
    lock_path(out).write_text(str(os.getppid()))  # a live process
    with pytest.raises(ConfigError, match=f"another tape run \\(process {os.getppid()}\\)"), \
            out_lock(out):
        pass
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(str(dead.pid))  # a stale one
    with out_lock(out):
        assert lock_path(out).read_text() == str(os.getpid())
    assert not lock_path(out).exists()
