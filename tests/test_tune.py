"""`tape tune`: Optuna over a policy's parameters, scored like `tape evolve`, no LLM."""

from __future__ import annotations

import importlib.util
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optuna")

from tape import policies
from tape.errors import ConfigError
from tape.evolution import tune as tuning
from tape.placement import Placement
from tape.settings import SMALL_SYNTHETIC, Settings

SMALL = Settings(version=2, **SMALL_SYNTHETIC)
# 1000 steps: the held-out quarter covers two window pairs, not one.
LONGER = Settings(version=2, **{**SMALL_SYNTHETIC, "synthetic_steps": 1000})
HAS_TAPE_POLICY = importlib.util.find_spec("tape.policies.tape") is not None


def spare_to_hot(weight, layout, *, previous=None, history=None, hot_share=0.0):
    """A stand-in tunable policy: each expert once, then a `hot_share` of the spare slots go to
    the experts with the largest load per replica, the rest round-robin from expert 0."""
    layers, experts = weight.shape
    spare = layout.num_replicas - experts
    greedy = round(hot_share * spare)
    count = np.ones((layers, experts))
    columns = [np.tile(np.arange(experts), (layers, 1))]
    for _ in range(greedy):
        hottest = np.argmax(weight / count, axis=1)
        count[np.arange(layers), hottest] += 1
        columns.append(hottest[:, None])
    columns.append(np.tile(np.arange(spare - greedy) % experts, (layers, 1)))
    return Placement(np.concatenate(columns, axis=1), experts)


SPACE = {"hot_share": (0.0, 1.0, "float")}


@pytest.fixture
def stand_in(monkeypatch):
    policies.policy_names()  # load the built-in policies first
    monkeypatch.setitem(policies._REGISTRY, "tune-stand-in", spare_to_hot)
    return "tune-stand-in"


def test_split_windows_keeps_the_last_share_out():
    windows = np.arange(6)
    tuning_part, evaluation_part = tuning.split_windows(6, 0.25)  # ceil(1.5) = 2 held out
    assert windows[tuning_part].tolist() == [0, 1, 2, 3]
    assert windows[evaluation_part].tolist() == [4, 5]
    tuning_part, evaluation_part = tuning.split_windows(6, 0.5)
    assert windows[tuning_part].tolist() == [0, 1, 2]
    assert windows[evaluation_part].tolist() == [3, 4, 5]
    both = tuning.split_windows(6, 0.0)
    assert windows[both[0]].tolist() == windows[both[1]].tolist() == list(range(6))
    with pytest.raises(ConfigError, match="cannot be split"):
        tuning.split_windows(3, 0.25)
    with pytest.raises(ConfigError, match=r"holdout must be in \[0, 1\)"):
        tuning.split_windows(6, 1.0)


@pytest.mark.parametrize(
    ("space", "reason"),
    [
        ({}, "the search space is empty"),
        ({"x": (1.0, 0.0, "float")}, r"entry x=\(1.0, 0.0, 'float'\) must be .* with low < high"),
        ({"x": (0.0, 1.0, "normal")}, r"entry x=\(0.0, 1.0, 'normal'\) .* kind in float, int, log"),
        ({"x": (0.0, 1.0, "log")}, "log-scaled parameter x needs low > 0, got 0.0"),
    ],
)
def test_bad_search_spaces_are_rejected(stand_in, space, reason):
    with pytest.raises(ConfigError, match=reason):
        tuning.tune(SMALL, trials=1, policy=stand_in, search_space=space)


def test_tuning_beats_the_defaults_on_held_out_windows(stand_in):
    result = tuning.tune(SMALL, trials=8, seed=0, holdout=0.25, policy=stand_in,
                         search_space=SPACE, presets={"round robin": {"hot_share": 0.0}})
    assert (result.tuning_windows, result.evaluation_windows) == (4, 2)
    assert len(result.trials) == 8
    assert result.trials[0]["params"] == {"hot_share": 0.0}  # the preset is tried first
    best_trial = max(result.trials, key=lambda trial: trial["combined_score"])
    assert result.best_params == best_trial["params"]
    assert result.best_params["hot_share"] > 0.5
    tuned, defaults = result.tuned.metrics, result.defaults.metrics
    assert tuned["combined_score"] > defaults["combined_score"]
    assert tuned["balancedness_score"] > defaults["balancedness_score"]
    # The comparison is on the held-out windows: 2 windows, 1 pair.
    assert len(result.tuned.per_pair["balancedness_score"]) == 1
    assert result.deepseek.metrics["combined_score"] > 0


def test_the_same_seed_gives_the_same_trials(stand_in):
    runs = [
        tuning.tune(SMALL, trials=4, seed=3, holdout=0.0, policy=stand_in, search_space=SPACE)
        for _ in range(2)
    ]
    assert [trial["params"] for trial in runs[0].trials] == [
        trial["params"] for trial in runs[1].trials
    ]


def test_outputs_hold_the_parameters_a_program_and_a_manifest(stand_in, tmp_path):
    result = tuning.tune(SMALL, trials=2, seed=0, holdout=0.0, policy=stand_in,
                         search_space=SPACE)
    paths = tuning.write_outputs(result, SMALL, tmp_path / "out", trials=2, seed=0, holdout=0.0)
    params = json.loads(paths["params"].read_text())
    assert params == {"policy": stand_in, "version": 2, "params": result.best_params}
    program = paths["program"].read_text()
    compile(program, str(paths["program"]), "exec")
    assert f"POLICY = {stand_in!r}" in program
    assert f"'hot_share': {result.best_params['hot_share']!r}," in program
    assert "from tape.api import rebalance_experts" in program
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["combined_score"]["tuned"] == result.tuned.metrics["combined_score"]
    assert manifest["combined_score"]["deepseek"] == result.deepseek.metrics["combined_score"]
    assert len(manifest["trial_history"]) == 2 and manifest["settings"]["version"] == 2
    with pytest.raises(ConfigError, match="already holds files"):
        tuning.write_outputs(result, SMALL, tmp_path / "out", trials=2, seed=0, holdout=0.0)


# -- the real `tape` policy (skipped until it is registered) -------------------------------------

needs_tape_policy = pytest.mark.skipif(not HAS_TAPE_POLICY, reason="tape policy not available")


@needs_tape_policy
def test_tuning_the_tape_policy_beats_deepseek_and_the_program_runs_sandboxed(tmp_path):
    from tape.protocol import score_policy, score_program

    result = tuning.tune(LONGER, trials=6, seed=0, holdout=0.25)
    assert result.policy == "tape"
    assert result.tuned.metrics["combined_score"] >= result.deepseek.metrics["combined_score"]
    paths = tuning.write_outputs(result, LONGER, tmp_path / "out", trials=6, seed=0,
                                 holdout=0.25)
    # The program file, run in the sandbox, places exactly as the tuned policy under the
    # protocol (it keeps its previous placement and the earlier windows itself).
    sandboxed = score_program(paths["program"], LONGER.windows(), LONGER.layout(), version=2,
                              timeout_s=30)
    direct = score_policy("tape", LONGER.windows(), LONGER.layout(), version=2,
                          params=result.best_params)
    assert sandboxed.error is None
    for placed, expected in zip(sandboxed.placements, direct.placements):
        np.testing.assert_array_equal(placed.phy2log, expected.phy2log)
    assert sandboxed.metrics["combined_score"] == pytest.approx(direct.metrics["combined_score"])


def tune_from_the_command_line(tmp_path, steps: int, version: str, trials: int, *extra: str):
    """`tape tune` on a small synthetic trace of `steps` steps, into tmp_path / "tuned"."""
    import typer
    from typer.testing import CliRunner

    from tape.cli.evolve import register
    from tape.synthetic import synthetic_trace

    app = typer.Typer()
    register(app)
    trace = tmp_path / "trace.npy"
    np.save(trace, synthetic_trace(num_steps=steps, num_layers=4, num_experts=32, num_groups=4))
    return CliRunner().invoke(app, [
        "tune", "--scoring", version, "--trials", str(trials), "--trace", str(trace),
        "--replicas", "48", "--groups", "4", "--nodes", "2", "--gpus", "8",
        "--out", str(tmp_path / "tuned"), *extra,
    ])


@needs_tape_policy
def test_tape_tune_from_the_command_line(tmp_path):
    result = tune_from_the_command_line(tmp_path, steps=600, version="2", trials=3)
    assert result.exit_code == 0, result.output
    assert "tuned - deepseek combined_score" in result.output
    for name in ("best_params.json", "tuned_program.py", "tune_manifest.json"):
        assert Path(tmp_path / "tuned" / name).is_file()


@needs_tape_policy
def test_tape_tune_realistic_with_a_single_held_out_pair(tmp_path):
    # One held-out pair has no rebalance to migrate: its migration column shows "-".
    result = tune_from_the_command_line(tmp_path, steps=350, version="realistic", trials=2)
    assert result.exit_code == 0, result.output
    assert "tuned - deepseek combined_score" in result.output
    assert "Traceback" not in result.output


def test_only_finished_trials_are_listed_when_presets_outnumber_the_trials(stand_in):
    presets = {"round robin": {"hot_share": 0.0}, "greedy": {"hot_share": 1.0}}
    result = tuning.tune(SMALL, trials=1, holdout=0.0, policy=stand_in, search_space=SPACE,
                         presets=presets)
    assert result.trials == [{"number": 0, "params": {"hot_share": 0.0},
                              "combined_score": result.trials[0]["combined_score"]}]
    assert result.trials[0]["combined_score"] is not None and not result.interrupted


class OptunaRecords(logging.Handler):
    """Keeps what Optuna logs (its logger does not propagate to pytest's capture)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def optuna_records():
    handler = OptunaRecords()
    logging.getLogger("optuna").addHandler(handler)
    yield handler.messages
    logging.getLogger("optuna").removeHandler(handler)


def interrupt_at_call(monkeypatch, number: int) -> None:
    """Ctrl-C (once) in the `number`th policy run of tape tune (1: the first trial's)."""
    calls = []
    score_policy = tuning.score_policy

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return score_policy(*args, **kwargs)

    monkeypatch.setattr(tuning, "score_policy", interrupted)


@needs_tape_policy
def test_ctrl_c_during_tape_tune_keeps_the_finished_trials(tmp_path, monkeypatch,
                                                           optuna_records):
    interrupt_at_call(monkeypatch, 3)  # during the third trial
    result = tune_from_the_command_line(tmp_path, steps=600, version="2", trials=5)
    assert result.exit_code == 130, result.output
    assert "interrupted after 2 of 5 trials: the results are those of the finished trials" \
        in result.output
    assert "Traceback" not in result.output and optuna_records == []  # no "Trial 2 failed"
    manifest = json.loads((tmp_path / "tuned" / "tune_manifest.json").read_text())
    assert manifest["interrupted"] is True and manifest["finished_trials"] == 2
    assert [trial["number"] for trial in manifest["trial_history"]] == [0, 1]
    assert (tmp_path / "tuned" / "tuned_program.py").is_file()


@needs_tape_policy
def test_ctrl_c_before_any_trial_finished_writes_nothing(tmp_path, monkeypatch, optuna_records):
    interrupt_at_call(monkeypatch, 1)
    result = tune_from_the_command_line(tmp_path, steps=600, version="2", trials=5)
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines() == [
        "interrupted before any trial finished; nothing written"]
    assert optuna_records == [] and not (tmp_path / "tuned").exists()


def test_ctrl_c_during_the_comparison_keeps_the_best_trial_without_scores(stand_in, tmp_path,
                                                                          monkeypatch):
    interrupt_at_call(monkeypatch, 3)  # the first run of the comparison, after 2 trials
    result = tuning.tune(SMALL, trials=2, holdout=0.0, policy=stand_in, search_space=SPACE)
    assert result.interrupted and not result.compared and not result.tuned_below_defaults
    assert len(result.trials) == 2 and result.tuned is result.defaults is result.deepseek is None
    best = max(result.trials, key=lambda trial: trial["combined_score"])
    assert result.best_params == best["params"]
    paths = tuning.write_outputs(result, SMALL, tmp_path / "out", trials=2, seed=0, holdout=0.0)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["compared"] is False and manifest["interrupted"] is True
    assert manifest["scores"] is None and manifest["finished_trials"] == 2
    assert json.loads(paths["params"].read_text())["params"] == best["params"]


@needs_tape_policy
def test_ctrl_c_during_the_final_comparison_of_tape_tune_still_writes_the_results(
        tmp_path, monkeypatch):
    interrupt_at_call(monkeypatch, 4)  # the comparison's first run, after 3 trials
    result = tune_from_the_command_line(tmp_path, steps=600, version="2", trials=3)
    assert result.exit_code == 130, result.output
    assert "interrupted during the final comparison: best_params.json, tuned_program.py, " \
        "tune_manifest.json hold the best of the 3 finished trials (of 3), not compared with " \
        "the defaults or deepseek" in result.output
    assert "Traceback" not in result.output and "tuned - deepseek" not in result.output
    manifest = json.loads((tmp_path / "tuned" / "tune_manifest.json").read_text())
    assert manifest["compared"] is False and manifest["finished_trials"] == 3
    assert (tmp_path / "tuned" / "tuned_program.py").is_file()


def test_an_interrupted_write_leaves_no_folder(stand_in, tmp_path, monkeypatch):
    result = tuning.tune(SMALL, trials=1, holdout=0.0, policy=stand_in, search_space=SPACE)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning, "tuned_program_text", interrupted)  # the second file of three
    with pytest.raises(KeyboardInterrupt):
        tuning.write_outputs(result, SMALL, tmp_path / "out", trials=1, seed=0, holdout=0.0)
    assert not (tmp_path / "out").exists()


@needs_tape_policy
def test_tape_tune_says_when_the_tuned_parameters_score_below_the_defaults(tmp_path, monkeypatch):
    from tape.protocol import ProgramScore

    def scored(combined: float) -> ProgramScore:
        return ProgramScore(metrics={"combined_score": combined, "balancedness_score": 0.5,
                                     "communication_score": 0.25})

    below = tuning.TuneResult(
        policy="tape", best_params={"tolerance": 0.05}, tuned=scored(0.31234),
        defaults=scored(0.3234), deepseek=scored(0.3), trials=[], tuning_windows=6,
        evaluation_windows=6,
    )
    monkeypatch.setattr(tuning, "tune", lambda *args, **kwargs: below)
    result = tune_from_the_command_line(tmp_path, 600, "2", 1, "--holdout", "0")
    assert result.exit_code == 0, result.output
    assert "warning: on the 6 windows the tuned parameters score below the tape policy's " \
        "defaults (0.3123 < 0.3234); they are written all the same" in result.output
    assert "tape tune, version 2: all 6 windows" in result.output
    # The table fits 80 columns (CliRunner's width): no header or number is cut.
    assert "…" not in result.output
    header = next(line for line in result.output.splitlines() if "tape tuned" in line)
    assert header.split() == ["metric", "tape", "tuned", "tape", "defaults", "deepseek"]
    assert json.loads((tmp_path / "tuned" / "best_params.json").read_text())["params"] == {
        "tolerance": 0.05}  # the tuned parameters, as reported


def test_an_out_that_cannot_be_written_stops_tape_tune_before_any_trial(tmp_path, monkeypatch):
    import tape.cli.common

    def read_only(out):
        raise PermissionError(13, "Permission denied")

    def no_trial(*args, **kwargs):
        raise AssertionError("tape tune ran trials for an --out it cannot write")

    monkeypatch.setattr(tape.cli.common, "probe_writable", read_only)
    monkeypatch.setattr(tuning, "tune", no_trial)
    result = tune_from_the_command_line(tmp_path, 600, "2", 1)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: cannot write to --out {tmp_path / 'tuned'}: Permission denied"]


def test_results_that_cannot_be_moved_into_out_are_a_one_line_error_naming_where_they_are(
        stand_in, tmp_path, monkeypatch):
    result = tuning.tune(SMALL, trials=1, holdout=0.0, policy=stand_in, search_space=SPACE)
    out = tmp_path / "out"
    program_text = tuning.tuned_program_text

    def made_meanwhile(*args, **kwargs):  # another run makes --out while these files are written
        out.mkdir()
        return program_text(*args, **kwargs)

    monkeypatch.setattr(tuning, "tuned_program_text", made_meanwhile)
    with pytest.raises(ConfigError, match=r"could not move the results into .*out \(another run "
                       r"made it meanwhile\); they are in .*\.out\.staging-") as caught:
        tuning.write_outputs(result, SMALL, out, trials=1, seed=0, holdout=0.0)
    kept = Path(str(caught.value).rsplit("they are in ", 1)[1])
    assert (kept / "tune_manifest.json").is_file() and list(out.iterdir()) == []


def test_a_killed_runs_staging_folder_does_not_make_a_run_folder_used(tmp_path):
    from tape.errors import ConfigError
    from tape.files import require_new_folder

    out = tmp_path / "out"
    (out / ".staging-0123456789ab").mkdir(parents=True)
    require_new_folder(out)  # the up-front check of tape tune agrees with the final one
    (out / "x").write_text("")
    with pytest.raises(ConfigError, match="already holds files"):
        require_new_folder(out)


# -- the study in Optuna's RDB storage: resume after a kill, several processes on one study ----


def tune_process(tmp_path, out, trials, *extra) -> subprocess.Popen:
    """`tape tune` on the small synthetic problem, in a process of its own."""
    from tape.synthetic import synthetic_trace

    trace = tmp_path / "trace.npy"
    if not trace.exists():
        np.save(trace, synthetic_trace(num_steps=600, num_layers=4, num_experts=32,
                                       num_groups=4))
    return subprocess.Popen(
        [sys.executable, "-c", "from tape.cli import main; main()", "tune",
         "--scoring", "2", "--trials", str(trials), "--trace", str(trace), "--replicas", "48",
         "--groups", "4", "--nodes", "2", "--gpus", "8", "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished_trials(url: str) -> list:
    import optuna

    try:
        study = optuna.load_study(study_name=tuning.STUDY_NAME, storage=url)
    except Exception:  # noqa: BLE001 - not made yet
        return []
    return [trial for trial in study.trials if trial.state.name == "COMPLETE"]


@needs_tape_policy
def test_a_killed_tape_tune_resumes_with_every_finished_trial(tmp_path):
    out = tmp_path / "tuned"
    url = f"sqlite:///{out / tuning.STUDY_FILE}"
    process = tune_process(tmp_path, out, 200)
    deadline = time.monotonic() + 120
    while len(finished_trials(url)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {trial.number: trial.params for trial in finished_trials(url)}
    assert len(before) >= 3
    again = tune_from_the_command_line(tmp_path, steps=600, version="2", trials=3)
    assert again.exit_code == 2 and "pass --resume" in again.output  # not without --resume
    target = len(before) + 2
    resumed = tune_from_the_command_line(tmp_path, 600, "2", target, "--resume")
    assert resumed.exit_code == 0, resumed.output
    manifest = json.loads((out / "tune_manifest.json").read_text())
    history = {trial["number"]: trial["params"] for trial in manifest["trial_history"]}
    assert manifest["finished_trials"] == target
    assert all(history[number] == params for number, params in before.items())


@needs_tape_policy
def test_two_processes_tune_one_study_together(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    processes = [tune_process(tmp_path, tmp_path / f"out{index}", 6, "--storage", url,
                              "--resume") for index in range(2)]
    for process in processes:
        _, errors = process.communicate(timeout=300)
        assert process.returncode == 0, errors
    trials = finished_trials(url)
    assert 6 <= len(trials) <= 8  # each stops once 6 finished in all (one more may be running)
    manifests = [json.loads((tmp_path / f"out{index}" / "tune_manifest.json").read_text())
                 for index in range(2)]
    assert max(manifest["finished_trials"] for manifest in manifests) == len(trials)


def test_a_resume_with_other_settings_or_a_bad_storage_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot open the study storage nosuch://u:\\*\\*\\*@h"):
        tuning.tune(SMALL, trials=1, holdout=0.0, storage="nosuch://u:secret@h/db")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    tuning.tune(SMALL, trials=1, holdout=0.0, storage=url)
    with pytest.raises(ConfigError, match="already holds a tape tune study; pass --resume"):
        tuning.tune(SMALL, trials=2, holdout=0.0, storage=url)
    with pytest.raises(ConfigError, match="cannot resume: .* another holdout"):
        tuning.tune(SMALL, trials=2, holdout=0.25, storage=url, resume=True)
    assert len(tuning.tune(SMALL, trials=2, holdout=0.0, storage=url, resume=True).trials) == 2


def test_a_trial_another_process_finished_first_does_not_end_the_search():
    # Two processes on one SQLite study may both take the same enqueued trial; the second to
    # finish it is told "Cannot tell a COMPLETE trial" by Optuna and must go on, while any other
    # error still ends the search.
    optuna = pytest.importorskip("optuna")

    class Study:
        def __init__(self, failures):
            self.failures, self.finished, self.calls = list(failures), 0, 0

        def get_trials(self, deepcopy, states):
            return [None] * self.finished

        def optimize(self, objective, n_trials, callbacks):
            self.calls += 1
            if self.failures:
                self.finished += 1  # the other process's trial
                raise self.failures.pop(0)
            self.finished += n_trials

    raced = Study([ValueError("Cannot tell a COMPLETE trial.")])
    tuning._optimize(optuna, raced, None, trials=5)
    assert raced.finished == 5 and raced.calls == 2
    with pytest.raises(ValueError, match="something else"):
        tuning._optimize(optuna, Study([ValueError("something else")]), None, trials=5)
