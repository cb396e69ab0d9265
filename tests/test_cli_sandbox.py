"""The sandbox seen from the command line: --isolation, --budget, and runs that one hostile
program cannot sink."""


from __future__ import annotations

import json

import pytest
from conftest import GOOD_PROGRAM, SMALL_LAYOUT
from test_cli import runner

from tape import isolation as isolation_module
from tape.cli import app
from tape.isolation import bwrap_failure

# Returns a placement computed once, from the first window, with the clock forged: its calls
# take no time of their own.
INSTANT = GOOD_PROGRAM.replace("def rebalance_experts", "def good") + """
import time

time.perf_counter = lambda: 0.0
CACHE = []

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    if not CACHE:
        CACHE.append(good(weight, num_replicas, num_groups, num_nodes, num_gpus))
    return CACHE[0]
"""


@pytest.fixture()
def no_bwrap(monkeypatch):
    """bwrap missing, as on a machine without the bubblewrap package."""
    monkeypatch.setattr(isolation_module, "bwrap_failure", lambda: "bwrap is not installed")
    monkeypatch.setattr(isolation_module, "_warned", False)


def evaluate(program, trace, *extra):
    return runner.invoke(app, ["evaluate", str(program), "--trace", str(trace), "--interval",
                               "10", "--json", *SMALL_LAYOUT, *extra])


def test_strict_isolation_refuses_to_run_without_bwrap(no_bwrap, small_trace, good_program):
    result = evaluate(good_program, small_trace, "--isolation", "strict")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "isolation strict cannot run: bwrap is not installed" in lines[0]
    assert "apt-get install bubblewrap" in lines[0]


def test_auto_isolation_falls_back_with_a_one_line_warning(no_bwrap, small_trace, good_program):
    result = evaluate(good_program, small_trace)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "partial isolation (bwrap is not installed)" in warning[0]
    assert "/proc" in warning[0] and "bubblewrap" in warning[0]
    assert json.loads(result.stdout)["isolation"] == "partial"


def test_the_result_names_bwrap_isolation_where_it_runs(small_trace, good_program):
    if bwrap_failure() is not None:
        pytest.skip(f"bwrap cannot run here: {bwrap_failure()}")
    result = evaluate(good_program, small_trace, "--isolation", "strict")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["isolation"] == "bwrap"
    assert "warning" not in result.stderr


def test_an_unknown_isolation_is_a_one_line_error(small_trace, good_program):
    result = evaluate(good_program, small_trace, "--isolation", "paranoid")
    assert result.exit_code == 2
    assert "unknown isolation 'paranoid'; expected one of auto, strict, partial" in result.stderr


@pytest.mark.parametrize("setting", ["auto", "partial"])
def test_evaluate_dir_records_every_program_and_goes_on(tmp_path, small_trace, good_program,
                                                        setting):
    folder = tmp_path / "programs"
    folder.mkdir()
    (folder / "a_good.py").write_text(good_program.read_text())
    (folder / "b_instant.py").write_text(INSTANT)
    (folder / "c_raises.py").write_text("def rebalance_experts(*arguments):\n"
                                        "    raise OSError('\x1b[2J')\n")
    (folder / "d_sleeps.py").write_text(
        GOOD_PROGRAM.replace("def rebalance_experts", "def good") + "import time\n"
        "def rebalance_experts(*arguments):\n    time.sleep(0.6)\n    return good(*arguments)\n")
    out = tmp_path / "results"
    result = runner.invoke(app, ["evaluate-dir", str(folder), "--trace", str(small_trace),
                                 "--interval", "10", "--out", str(out), "--timeout", "1",
                                 "--budget", "1", "--isolation", setting, *SMALL_LAYOUT])
    assert result.exit_code == 0, result.output
    results = {name: json.loads((out / f"{name}_result.json").read_text())
               for name in ("a_good", "b_instant", "c_raises", "d_sleeps")}
    assert results["a_good"]["error"] is None
    instant = results["b_instant"]
    assert instant["error"] is None and 0 < instant["avg_raw_time"]
    assert instant["speed_score"] < 1e6  # timed from outside: the forged clock counts for nothing
    raised = results["c_raises"]["error"]
    assert "OSError" in raised and "\x1b" not in raised
    assert "time budget of 1 s" in results["d_sleeps"]["error"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["isolation"] in ("bwrap", "partial")
    assert all(result["isolation"] == manifest["isolation"] for result in results.values())
    assert "\x1b" not in result.output


def test_compare_records_a_failing_program_and_scores_the_rest(tmp_path, small_trace,
                                                              good_program):
    broken = tmp_path / "broken.py"
    broken.write_text("def rebalance_experts(*args):\n    return None\n")
    out = tmp_path / "compare"
    result = runner.invoke(app, ["compare", "--trace", str(small_trace), "--interval", "10",
                                 "--policies", "vanilla", "--program", str(good_program),
                                 "--program", str(broken), "--out", str(out), "--json",
                                 *SMALL_LAYOUT])
    assert result.exit_code == 1, result.output  # a program failed: the exit code says so
    data = json.loads(result.stdout)
    assert set(data["isolation"]) == {"good.py", "broken.py"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["isolation"]["good.py"] in ("bwrap", "partial")
