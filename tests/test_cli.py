"""End-to-end tests of the `tape` command line on small traces."""

import json
import sys

import numpy as np
import pytest
from conftest import SMALL_LAYOUT
from typer.testing import CliRunner

from tape.cli import app
from tape.cli.formatting import format_value

runner = CliRunner()
def _json(result):
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def test_evaluate_json_has_every_metric_and_per_pair_lists(small_trace, good_program):
    result = runner.invoke(app, ["evaluate", str(good_program), "--trace", str(small_trace),
                                 "--interval", "10", "--scoring", "3", "--json", *SMALL_LAYOUT])
    assert result.exit_code == 0, result.output
    data = _json(result)
    for key in ("balancedness_score", "speed_score", "communication_score",
                "weight_copy_score", "combined_score", "avg_raw_time",
                "overall_balancedness", "compute_balancedness", "efficiency",
                "gpu_balancedness"):
        assert key in data, key
    assert data["error"] is None
    assert len(data["per_pair"]["balancedness_score"]) == 3  # 4 windows -> 3 pairs
    expected = (data["balancedness_score"] + data["speed_score"]
                + data["communication_score"]) / 3
    assert data["combined_score"] == pytest.approx(expected)


def test_evaluate_prints_a_table(small_trace, good_program):
    # Version 2 has no timing in its score: the table shows the numbers --json gives.
    arguments = ["evaluate", str(good_program), "--trace", str(small_trace), "--interval", "10",
                 "--scoring", "2", *SMALL_LAYOUT]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    scores = json.loads(runner.invoke(app, [*arguments, "--json"]).stdout)
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in result.stdout.splitlines() if line.count("│") == 3}
    for metric in ("combined_score", "balancedness_score", "communication_score"):
        assert rows[metric] == format_value(scores[metric]), metric
    assert scores["combined_score"] == pytest.approx(
        (scores["balancedness_score"] + scores["communication_score"]) / 2)


@pytest.mark.parametrize("version, section", [("2", "seed metrics"),
                                              ("realistic", "realistic model")])
def test_evaluate_lists_the_combined_score_under_its_versions_heading(
        small_trace, good_program, version, section):
    result = runner.invoke(app, ["evaluate", str(good_program), "--trace", str(small_trace),
                                 "--interval", "10", "--scoring", version, *SMALL_LAYOUT])
    assert result.exit_code == 0, result.output
    names = [line.split("│")[1].rstrip() for line in result.stdout.splitlines()
             if line.count("│") == 3]
    heading = max(i for i, name in enumerate(names[:names.index("   combined_score")])
                  if not name.startswith("   "))
    assert names[heading].strip() == section


def test_program_without_rebalance_experts_scores_zero_with_reason(tmp_path, small_trace):
    program = tmp_path / "empty.py"
    program.write_text("x = 1\n")
    result = runner.invoke(app, ["evaluate", str(program), "--trace", str(small_trace),
                                 "--interval", "10", "--json", *SMALL_LAYOUT])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["combined_score"] == 0.0
    assert "rebalance_experts" in data["error"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--trace", "/no/such/trace.json"], "no such trace file"),
        # the flags a user typed, not the library's argument names (num_replicas, ...)
        (["--replicas", "10"], "error: --replicas (10) must be a multiple of --gpus (4)"),
        (["--replicas", "4", "--gpus", "4"], "error: --replicas (4) must be at least the"),
        (["--replicas", "0"], "error: --replicas must be a positive integer, got 0"),
        (["--groups", "3"], "error: --groups (3) must divide the number of experts (8)"),
        (["--nodes", "3"], "error: --gpus (4) must be a multiple of --nodes (3)"),
        (["--scoring", "7"], "unknown version"),
        (["--dispatch", "nearest"], "unknown dispatch"),
    ],
)
def test_user_mistakes_get_one_line_errors(small_trace, good_program, arguments, message):
    base = {"--trace": str(small_trace), "--replicas": "12", "--groups": "2", "--nodes": "2",
            "--gpus": "4", "--interval": "10"}
    for flag, value in zip(arguments[::2], arguments[1::2]):
        base[flag] = value
    flat = [item for pair in base.items() for item in pair]
    result = runner.invoke(app, ["evaluate", str(good_program), *flat])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and "num_" not in result.output


def test_synthetic_trace_errors_name_the_groups_flag():
    result = runner.invoke(app, ["compare", "--groups", "2", "--policies",
                                 "deepseek"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: cannot make the synthetic deepseek-v3 trace with "
                                    "--groups 2 and --seed 0: topk_groups (4) must be at most "
                                    "--groups (2)")


def test_the_synthetic_model_picks_the_trace():
    def deepseek_gpu_balance(*flags):
        result = runner.invoke(app, ["compare", "--policies", "deepseek", "--json", *flags])
        assert result.exit_code == 0, result.output
        payload = json.loads(result.output)
        return payload["trace"], payload["policies"]["deepseek"]["gpu_balancedness"]

    trace, calibrated = deepseek_gpu_balance()
    assert "(calibrated model, seed 0)" in trace
    trace, surges = deepseek_gpu_balance("--synthetic-model", "surges")
    assert "(surges model, seed 0)" in trace
    assert surges < calibrated - 0.03  # the surges make the next window harder


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--synthetic-model", "bursty"],
         "error: unknown synthetic model 'bursty'; known: calibrated, surges"),
        (["--synthetic-model", "surges", "--trace", "trace.npy"],
         "error: --synthetic-model applies to the synthetic trace, not to --trace"),
        # was ignored: runs with --seed 1, 2, ... on a trace were the same run
        (["--seed", "3", "--trace", "trace.npy"],
         "error: --seed applies to the synthetic trace, not to --trace"),
    ],
)
def test_a_bad_synthetic_model_is_one_line(extra, message):
    result = runner.invoke(app, ["compare", "--policies", "deepseek", *extra])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == message


def test_a_seed_beyond_the_largest_integer_is_refused_by_the_option():
    result = runner.invoke(app, ["compare", "--seed", "3000000000", "--policies", "deepseek"])
    assert result.exit_code == 2
    assert "--seed" in result.output and "--groups" not in result.output


def test_counts_of_one_are_singular(tmp_path):
    path = tmp_path / "trace.npy"
    np.save(path, np.ones((3, 1, 4)))
    result = runner.invoke(app, ["compare", "--trace", str(path), "--interval", "1",
                                 "--policies", "deepseek", "--replicas", "4", "--groups", "1",
                                 "--nodes", "1", "--gpus", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert ", 3 windows of 1 step; deepseek-v3 on h800: 1 GPU on 1 node, 4 slots;" in result.stdout


def test_evaluate_dir_writes_one_result_per_program(tmp_path, small_trace, good_program):
    folder = tmp_path / "programs"
    folder.mkdir()
    (folder / "good.py").write_text(good_program.read_text())
    (folder / "broken.py").write_text("def rebalance_experts(*args):\n    raise RuntimeError('x')\n")
    out = tmp_path / "results"
    result = runner.invoke(app, ["evaluate-dir", str(folder), "--trace", str(small_trace),
                                 "--interval", "10", "--out", str(out), *SMALL_LAYOUT])
    assert result.exit_code == 0, result.output
    good = json.loads((out / "good_result.json").read_text())
    broken = json.loads((out / "broken_result.json").read_text())
    assert good["combined_score"] > 0 and good["error"] is None
    assert broken["combined_score"] == 0.0 and "RuntimeError" in broken["error"]
    assert json.loads((out / "manifest.json").read_text())["programs"] == [
        "broken.py", "good.py"]
    assert f"wrote 3 files to {out}\n" in result.stdout  # as compare says where it wrote


@pytest.mark.parametrize("command", ["compare", "evaluate-dir"])
def test_an_empty_out_is_a_usage_error_not_the_current_folder(
        tmp_path, small_trace, good_program, command, monkeypatch):
    # `--out "$OUT"` with OUT unset was taken as ".": with --overwrite, results in the cwd
    monkeypatch.chdir(tmp_path)
    extra = [str(good_program.parent)] if command == "evaluate-dir" else []
    result = runner.invoke(app, [command, *extra, "--trace", str(small_trace), "--interval",
                                 "10", "--out", "", "--overwrite", *SMALL_LAYOUT])
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and "empty path" in result.output
    assert not list(tmp_path.glob("*.json"))


def test_compare_says_where_it_wrote_on_one_line(tmp_path, small_trace):
    out = tmp_path / ("a-long-folder-name-" * 4) / "compare"
    result = runner.invoke(app, ["compare", "--trace", str(small_trace), "--interval", "10",
                                 "--policies", "deepseek", "--out", str(out), *SMALL_LAYOUT])
    assert result.exit_code == 0, result.output
    assert f"wrote 8 files to {out}\n" in result.stdout  # not cut at 80 columns


def test_compare_writes_the_notebook_outputs(tmp_path, small_trace):
    out = tmp_path / "compare"
    result = runner.invoke(app, ["compare", "--trace", str(small_trace), "--interval", "10",
                                 "--policies", "vanilla,deepseek", "--out", str(out),
                                 *SMALL_LAYOUT])
    assert result.exit_code == 0, result.output
    for policy in ("vanilla", "deepseek"):
        for suffix in ("_gpu_loads.csv", "_gpu_loads_heatmap.png", "_gpu_loads_boxplot.png",
                       "_timeline.png"):
            assert (out / f"{policy}{suffix}").stat().st_size > 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison) == {"vanilla", "deepseek"}
    assert comparison["deepseek"]["gpu_balancedness"] >= comparison["vanilla"]["gpu_balancedness"]
    csv_rows = (out / "deepseek_gpu_loads.csv").read_text().splitlines()
    assert csv_rows[0] == "layer,GPU0,GPU1,GPU2,GPU3" and len(csv_rows) == 1 + 3


def test_compare_takes_policies_with_presets_and_parameters(tmp_path, small_trace):
    out = tmp_path / "compare"
    specs = "deepseek,tape:fast,tape:preset=all:migration_weight=0.5"
    result = runner.invoke(app, ["compare", "--trace", str(small_trace), "--interval", "10",
                                 "--policies", specs, "--out", str(out), *SMALL_LAYOUT])
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison) == specs.split(",")
    for stem in ("tape_fast", "tape_preset_all_migration_weight_0.5"):
        assert (out / f"{stem}_gpu_loads.csv").is_file()
    heavy = comparison["tape:preset=all:migration_weight=0.5"]["moved_experts"]
    assert heavy <= comparison["deepseek"]["moved_experts"]


@pytest.mark.parametrize("spec, message", [
    ("tape:turbo", "unknown tape preset 'turbo'"),
    ("deepseek:k=2", "policy 'deepseek' has no parameter 'k'"),
    ("tape:=3", "cannot read '=3'"),
    ("tape:search_rounds=1.5", "search_rounds must be an integer"),
])
def test_compare_rejects_bad_policy_parameters_before_running(tmp_path, small_trace, spec,
                                                             message):
    out = tmp_path / "compare"
    result = runner.invoke(app, ["compare", "--trace", str(small_trace), "--interval", "10",
                                 "--policies", f"deepseek,{spec}", "--out", str(out),
                                 *SMALL_LAYOUT])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_compare_rejects_unknown_policy(small_trace):
    result = runner.invoke(app, ["compare", "--trace", str(small_trace), "--interval", "10",
                                 "--policies", "deepseek,nope", *SMALL_LAYOUT])
    assert result.exit_code == 2
    assert "unknown policy 'nope'" in result.output


@pytest.mark.parametrize(
    "value, digits, text",
    [(14925, 3, "14.9k"), (1826, 3, "1826"), (0.75912, 3, "0.759"), (42.19e6, 3, "42.2M"),
     (0.0, 4, "0"), (float("nan"), 4, "nan"), (123.456, 4, "123.5"), (2.5e9, 4, "2.5G"),
     # rounded up to the next suffix, not "1e+03k"; beyond T scientific, not "1.86e+06T"
     (999_999, 3, "1M"), (999_960, 4, "1M"), (-14925, 3, "-14.9k"), (1.86e18, 3, "1.86e+18"),
     (float("inf"), 4, "inf")],
)
def test_format_value(value, digits, text):
    assert format_value(value, digits) == text


def test_a_long_error_stays_on_one_line(small_trace, good_program):
    result = runner.invoke(app, ["evaluate", str(good_program), "--trace", str(small_trace),
                               "--interval", "1000", *SMALL_LAYOUT])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) > 80, lines


def test_brackets_in_errors_and_paths_are_printed_as_written(tmp_path, good_program):
    folder = tmp_path / "[run 1]"
    folder.mkdir()
    result = runner.invoke(app, ["evaluate", str(good_program), "--trace",
                                 str(folder / "missing.npy"), *SMALL_LAYOUT])
    assert result.exit_code == 2
    assert "[run 1]/missing.npy" in result.output


@pytest.mark.parametrize("command", ["compare", "evaluate", "evaluate-dir", "place"])
def test_help_names_the_preset_defaults(command):
    # --cluster and --model default to None (a config file's preset: may choose): the help
    # shows no [default: ...] for them, so it says which preset is used
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())
    assert "preset:, else h800)" in text and "preset:, else deepseek-v3)" in text


@pytest.mark.parametrize("command", [
    "compare", "evaluate", "evaluate-dir", "place", "evolve", "tune"])
def test_help_shows_the_trace_shape_and_whole_default_folders(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert ".npy/.npz [steps, layers, experts]" in text
    assert "…" not in text  # nothing cut off
    if command in ("evolve", "tune"):
        assert f"tape-out/{command}-v4 for --scoring 4" in text


def test_command_help_paragraphs_have_no_line_breaks():
    # typer's help keeps a paragraph's line breaks: "for a program" / "that fails."
    import typer.main

    for name, command in typer.main.get_command(app).commands.items():
        for paragraph in (command.help or "").split("\n\n"):
            assert "\n" not in paragraph.strip(), (name, paragraph)


@pytest.mark.parametrize("command", [
    [], ["compare"], ["evaluate-dir"], ["place"], ["evolve"], ["tune"]])
def test_help_shows_flags_without_a_placeholder(command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    flags = [line for line in result.output.splitlines()
             if any(f"│ {flag} " in line for flag in ("--help", "--no-cache", "--json",
                                                       "--overwrite", "--scoring", "--version"))]
    assert any("--help" in line for line in flags)
    for line in flags:
        if line.lstrip("│ ").startswith("--scoring"):
            assert "<str>" in line, line  # the scoring version takes a value
        else:
            assert "<" not in line, line


@pytest.mark.parametrize("command, kind", [
    *((command, kind) for command in (["compare", "--policies", "deepseek"], ["evaluate-dir"],
                                      ["tune", "--trials", "1"])
      for kind in ("file", "used folder")),
    (["evolve"], "file"),  # a used folder: tape evolve's own message, which names --resume
])
def test_out_that_is_a_file_or_holds_results_is_refused_untouched(tmp_path, small_trace,
                                                                   good_program, command, kind):
    if command == ["evaluate-dir"]:
        command = ["evaluate-dir", str(good_program.parent)]
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "manifest.json").write_text("mine")
    result = runner.invoke(app, [*command, "--trace", str(small_trace), "--interval", "10",
                                 "--out", str(out), *SMALL_LAYOUT])
    assert result.exit_code == 2, result.output
    assert ("is a file" if kind == "file" else "already holds files") in result.output
    assert (out.read_text() if kind == "file" else (out / "manifest.json").read_text()) == "mine"
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["compare", "--policies", "deepseek"], ["evaluate-dir"]])
def test_overwrite_writes_into_a_used_out_folder(tmp_path, small_trace, good_program, command):
    if command == ["evaluate-dir"]:
        command = ["evaluate-dir", str(good_program.parent)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("an earlier run")
    (out / "notes.txt").write_text("mine")
    arguments = [*command, "--trace", str(small_trace), "--interval", "10", "--out", str(out),
                 *SMALL_LAYOUT]
    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 2 and "pass --overwrite" in refused.output
    result = runner.invoke(app, [*arguments, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())  # replaced by this run's
    assert (out / "notes.txt").read_text() == "mine"  # other files are left alone


@pytest.mark.parametrize("command", ["compare", "evaluate"])
def test_negative_seed_is_a_usage_error(good_program, command):
    extra = [str(good_program)] if command == "evaluate" else []
    result = runner.invoke(app, [command, *extra, "--seed", "-1", *SMALL_LAYOUT])
    assert result.exit_code == 2, result.output
    assert "--seed" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option, value", [
    ("--timeout", "inf"), ("--timeout", "1e300"), ("--memory-mb", str(10**17))])
def test_sandbox_limits_beyond_what_can_be_set_are_usage_errors(small_trace, good_program,
                                                                  option, value):
    # an infinite or huge timeout was a traceback from Python's wait; a huge memory limit made
    # every call fail with "the program's process exited unexpectedly"
    result = runner.invoke(app, ["evaluate", str(good_program), "--trace", str(small_trace),
                                 "--interval", "10", option, value, *SMALL_LAYOUT])
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output


def test_tune_rejects_a_negative_sampler_seed(small_trace, tmp_path):
    result = runner.invoke(app, ["tune", "--trace", str(small_trace), "--sampler-seed", "-1",
                                 "--trials", "1", "--out", str(tmp_path / "tune"), *SMALL_LAYOUT])
    assert result.exit_code == 2, result.output
    assert "--sampler-seed" in result.output and not (tmp_path / "tune").exists()


def test_evaluate_and_evaluate_dir_point_at_each_other(good_program):
    result = runner.invoke(app, ["evaluate", str(good_program.parent)])
    assert result.exit_code == 2 and "tape evaluate-dir" in result.output, result.output
    result = runner.invoke(app, ["evaluate-dir", str(good_program)])
    assert result.exit_code == 2 and "`tape evaluate " in result.output, result.output
    result = runner.invoke(app, ["evaluate-dir", str(good_program.parent / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output, result.output


@pytest.mark.parametrize("policies", [
    None, ["deepseek", "tape:fast", "tape:preset=all:migration_weight=0.1",
           "min-moves:tolerance=0.05"]])
def test_compare_table_never_cuts_numbers_or_wraps_labels_at_80_columns(policies):
    import io

    from rich.console import Console

    from tape.cli.compare import _ROWS, DEFAULT_POLICIES, _table

    policies = policies or DEFAULT_POLICIES
    keys = ["combined_score", *(key for _, rows in _ROWS for key, _, scale in rows if scale == 1)]
    # -0.00123: the widest number the table shows (8 characters)
    # every row has a value (a row no policy has is left out); the scaled ones 0
    scaled = [key for _, rows in _ROWS for key, _, scale in rows if scale != 1]
    summary = {name: {**dict.fromkeys(scaled, 0.0), **dict.fromkeys(keys, -0.00123456),
                      "error": None} for name in policies}
    console = Console(width=80, file=io.StringIO())
    console.print(_table(summary, "realistic"))
    text = console.file.getvalue()
    assert text.count("-0.00123") == len(keys) * len(policies)
    assert "…" not in text
    lines = text.splitlines()
    labels = ["score (realistic)", *(section for section, _ in _ROWS),
              *(f"  {label}" for _, rows in _ROWS for _, label, _ in rows)]
    for label in labels:  # each on one line of its own, not wrapped
        assert any(line.startswith(label + " ") for line in lines), label
    assert max(len(line) for line in lines) <= 80


def test_compare_table_shows_the_chosen_versions_score_first(small_trace):
    arguments = ["compare", "--trace", str(small_trace), "--interval", "10", "--policies",
                 "vanilla,deepseek", *SMALL_LAYOUT]
    for version, label, same_as in (("2", "score (v2)", "  seed v2 "),
                                    ("realistic", "score (realistic)", "  realistic ")):
        result = runner.invoke(app, [*arguments, "--scoring", version])
        assert result.exit_code == 0, result.output
        lines = result.stdout.splitlines()
        row = lines[1 + next(i for i, line in enumerate(lines) if line.startswith("───"))]
        assert row.startswith(label + " ")  # first, below the header
        # the chosen version's numbers (all but v2 time the policy: they differ run to run)
        numbers = row.split()[-2:]
        assert numbers == next(line for line in lines if line.startswith(same_as)).split()[-2:]
        if version == "2":
            scores = json.loads(runner.invoke(app, [*arguments, "--scoring", "2",
                                                    "--json"]).stdout)["policies"]
            assert numbers == [format_value(scores[name]["combined_score"], 3)
                               for name in ("vanilla", "deepseek")]


def test_evaluate_dir_lists_errors_below_the_table_and_leaves_no_blank_lines(
        tmp_path, small_trace, good_program):
    folder = tmp_path / "programs"
    folder.mkdir()
    (folder / "good.py").write_text(good_program.read_text())
    (folder / "broken.py").write_text("def rebalance_experts(*args):\n    raise RuntimeError('x')\n")
    result = runner.invoke(app, ["evaluate-dir", str(folder), "--trace", str(small_trace),
                                 "--interval", "10", *SMALL_LAYOUT])
    assert result.exit_code == 0, result.output
    assert "(failed)" in result.stdout
    assert result.stderr.splitlines() == [
        "broken.py failed: rebalance_experts raised RuntimeError: x (line 2 of the program)"]


def test_evolve_checks_the_trace_before_making_its_folder(tmp_path, small_trace):
    out = tmp_path / "evolve"
    result = runner.invoke(app, ["evolve", "--trace", str(small_trace), "--interval", "1000",
                                 "--out", str(out), *SMALL_LAYOUT],
                           env={"OPENAI_API_KEY": "unused"})
    assert result.exit_code == 2, result.output
    assert "at least 2 windows" in result.output
    assert not out.exists()


def test_evaluate_refuses_a_program_that_is_not_a_python_file(tmp_path, small_trace):
    program = tmp_path / "policy.txt"
    program.write_text("def rebalance_experts(*args):\n    pass\n")
    result = runner.invoke(app, ["evaluate", str(program), "--trace", str(small_trace),
                                 "--interval", "10", *SMALL_LAYOUT])
    assert result.exit_code == 2, result.output
    assert "not a .py file" in result.output


def test_tape_version_prints_the_package_version():
    from tape import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"tape {__version__}"


def test_evaluate_dir_exits_1_when_no_program_scored(tmp_path, small_trace, good_program):
    folder = tmp_path / "programs"
    folder.mkdir()
    (folder / "broken.py").write_text("def rebalance_experts(*args):\n    raise RuntimeError('x')\n")
    arguments = ["evaluate-dir", str(folder), "--trace", str(small_trace), "--interval", "10",
                 *SMALL_LAYOUT]
    failed = runner.invoke(app, arguments)
    assert failed.exit_code == 1 and "broken.py failed" in failed.output
    as_json = runner.invoke(app, [*arguments, "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["broken.py"]["error"]
    (folder / "good.py").write_text(good_program.read_text())
    assert runner.invoke(app, arguments).exit_code == 0  # one program scored


def test_out_under_a_file_is_refused_before_the_run(tmp_path, small_trace):
    result = runner.invoke(app, ["compare", "--trace", str(small_trace), "--interval", "10",
                                 "--policies", "deepseek", "--out", str(small_trace / "sub"),
                                 *SMALL_LAYOUT])
    assert result.exit_code == 2 and "which is a file" in result.output


def test_a_huge_count_is_a_usage_error(small_trace):
    result = runner.invoke(app, ["compare", "--trace", str(small_trace), "--interval",
                                 str(10**20), "--policies", "deepseek", *SMALL_LAYOUT])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: --interval must be at most 2147483647, got {10**20}" in result.output


def _interrupt_on(monkeypatch, target, name):
    """Make the writer `target` (a dotted path) raise KeyboardInterrupt when it writes `name`,
    as Ctrl-C would midway through a run's output."""
    import importlib

    module_name, attribute = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    writer = getattr(module, attribute)

    def interrupted(path, *args, **kwargs):
        if path.name == name:
            raise KeyboardInterrupt
        return writer(path, *args, **kwargs)

    monkeypatch.setattr(module, attribute, interrupted)


@pytest.mark.parametrize("command, writer, name", [
    # deepseek's CSV and plots are written by the time comparison_per_window.csv is
    (["compare", "--policies", "deepseek"], "tape.report.write_records_csv",
     "comparison_per_window.csv"),
    (["evaluate-dir"], "tape.cli.evaluate.write_json_atomic", "manifest.json"),
])
@pytest.mark.parametrize("used", [False, True])
def test_ctrl_c_leaves_out_as_it_was(tmp_path, small_trace, good_program, monkeypatch, command,
                                     writer, name, used):
    if command == ["evaluate-dir"]:
        command = ["evaluate-dir", str(good_program.parent)]
    out = tmp_path / "results"
    if used:
        out.mkdir()
        (out / "manifest.json").write_text("an earlier run")
    before = sorted(p.name for p in tmp_path.iterdir())
    _interrupt_on(monkeypatch, writer, name)
    result = runner.invoke(app, [*command, "--trace", str(small_trace), "--interval", "10",
                                 "--out", str(out), *SMALL_LAYOUT,
                                 *(["--overwrite"] if used else [])])
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == f"interrupted; nothing written to {out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging folder left
    if used:
        assert [p.name for p in out.iterdir()] == ["manifest.json"]
        assert (out / "manifest.json").read_text() == "an earlier run"


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux's /proc")
@pytest.mark.parametrize("command", [["compare", "--policies", "deepseek"], ["evaluate-dir"]])
def test_out_that_cannot_be_written_is_refused_before_any_work(good_program, monkeypatch,
                                                               command):
    if command == ["evaluate-dir"]:
        command = ["evaluate-dir", str(good_program.parent)]

    def no_work(**kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(f"tape.cli.{command[0].split('-')[0]}.prepare", no_work)
    result = runner.invoke(app, [*command, "--out", "/proc/tape-out"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        "error: cannot write to --out /proc/tape-out: No such file or directory"]


@pytest.fixture()
def four_expert_trace(tmp_path):
    """8 slots on one GPU for 4 experts: replicate-hot and tape cannot place it."""
    path = tmp_path / "four.npy"
    np.save(path, np.random.default_rng(0).poisson(5.0, size=(20, 2, 4)).astype(float))
    return path


ONE_GPU = ["--replicas", "8", "--groups", "2", "--nodes", "1", "--gpus", "1"]


def test_default_compare_skips_a_policy_that_cannot_place_the_layout(four_expert_trace):
    result = runner.invoke(app, ["compare", "--trace", str(four_expert_trace), "--interval",
                                 "10", "--json", *ONE_GPU])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data["policies"]) == ["vanilla", "deepseek", "bldm", "min-moves"]
    assert set(data["skipped"]) == {"replicate-hot", "tape"}
    notes = result.stderr.splitlines()
    assert len(notes) == 2 and notes[0].startswith("note: skipped replicate-hot: replicate-hot "
                                                   "needs k (4) distinct experts")


def test_a_named_policy_that_cannot_place_the_layout_is_an_error(four_expert_trace):
    result = runner.invoke(app, ["compare", "--trace", str(four_expert_trace), "--interval",
                                 "10", "--policies", "deepseek,replicate-hot", *ONE_GPU])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: replicate-hot needs k (4) distinct experts")


def test_default_compare_with_no_policy_left_is_an_error(four_expert_trace, monkeypatch):
    from tape.policies import PolicyError

    def refuse(weight, layout, name, **params):
        raise PolicyError(f"{name} refuses")

    monkeypatch.setattr("tape.cli.compare.place", refuse)
    result = runner.invoke(app, ["compare", "--trace", str(four_expert_trace), "--interval",
                                 "10", *ONE_GPU])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith(
        "error: no built-in policy can place this layout (vanilla: vanilla refuses; ")


def test_a_killed_runs_staging_folder_is_not_a_used_out(tmp_path, small_trace):
    out = tmp_path / "results"
    (out / ".staging-0123456789ab").mkdir(parents=True)  # left by a run killed with SIGKILL
    args = ["compare", "--policies", "deepseek", "--trace", str(small_trace), "--interval", "10",
            *SMALL_LAYOUT, "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").exists()
    (out / "notes.txt").write_text("a real file")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "already holds files" in result.stderr


def test_results_that_cannot_be_moved_in_are_a_one_line_error_naming_where_they_are(
        tmp_path, small_trace, monkeypatch):
    out = tmp_path / "results"

    def made_meanwhile(*args, **kwargs):
        out.mkdir()
        return {}

    monkeypatch.setattr("tape.cli.compare.write_comparison", made_meanwhile)
    result = runner.invoke(app, ["compare", "--policies", "deepseek", "--trace", str(small_trace),
                                 "--interval", "10", *SMALL_LAYOUT, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "another run made it meanwhile" in result.stderr and "Traceback" not in result.output
    kept = [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert len(kept) == 1 and str(kept[0]) in result.stderr.replace("\n", "")


def test_sigterm_ends_the_command_like_an_error_so_its_output_is_cleaned_up(monkeypatch):
    import signal

    import tape.cli

    installed = {}
    monkeypatch.setattr(signal, "signal", lambda signum, handler: installed.update({signum: handler}))
    monkeypatch.setattr(tape.cli, "app", lambda: None)
    tape.cli.main()
    with pytest.raises(SystemExit) as caught:
        installed[signal.SIGTERM](signal.SIGTERM, None)
    assert caught.value.code == 128 + signal.SIGTERM


def test_policy_errors_name_the_flags_in_errors_and_skip_notes(tmp_path, small_trace):
    named = runner.invoke(app, ["compare", "--policies", "replicate-hot", "--trace",
                                str(small_trace), "--interval", "10", "--replicas", "12",
                                "--groups", "2", "--nodes", "1", "--gpus", "3"])
    assert named.exit_code == 2, named.output
    skipped = runner.invoke(app, ["compare", "--trace", str(small_trace), "--interval", "10",
                                  "--replicas", "12", "--groups", "2", "--nodes", "1",
                                  "--gpus", "3"])
    assert skipped.exit_code == 0, skipped.output
    assert "skipped replicate-hot" in skipped.stderr
    for output in (named.stderr, skipped.stderr):
        assert "--gpus" in output and "num_gpus" not in output


def test_compare_scores_programs_beside_the_policies(small_trace, good_program, tmp_path):
    arguments = ["--trace", str(small_trace), "--interval", "10", *SMALL_LAYOUT]
    result = runner.invoke(app, ["compare", "--policies", "deepseek", "--program",
                                 str(good_program), "--json", *arguments])
    assert result.exit_code == 0, result.output
    summary = _json(result)["policies"]
    assert list(summary) == ["deepseek", "good.py"]
    alone = _json(runner.invoke(app, ["evaluate", str(good_program), "--json", *arguments]))
    program = summary["good.py"]
    assert program["gpu_balancedness"] == pytest.approx(alone["gpu_balancedness"])
    assert program["moved_experts_ratio"] == pytest.approx(
        program["moved_experts"] / summary["deepseek"]["moved_experts"])
    broken = tmp_path / "broken.py"
    broken.write_text("def rebalance_experts(*args):\n    raise ValueError('no')\n")
    failed = runner.invoke(app, ["compare", "--policies", "deepseek", "--program", str(broken),
                                 *arguments])
    assert failed.exit_code == 1  # as tape evaluate on a failing program
    assert "broken.py" in failed.output and "ValueError" in failed.output


@pytest.mark.parametrize(("name", "message"), [
    ("missing.py", "does not exist"), ("notes.txt", "is not a .py file")])
def test_compare_refuses_a_bad_program_before_any_work(tmp_path, name, message):
    (tmp_path / "notes.txt").write_text("x")
    result = runner.invoke(app, ["compare", "--program", str(tmp_path / name)])
    assert result.exit_code == 2 and message in result.output, result.output


def test_compare_refuses_two_programs_of_one_name(tmp_path, good_program):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "good.py").write_text(good_program.read_text())
    result = runner.invoke(app, ["compare", "--program", str(good_program), "--program",
                                 str(other / "good.py")])
    assert result.exit_code == 2 and "two columns would be named 'good.py'" in result.output


def test_compare_scores_a_program_given_twice_once(small_trace, good_program, monkeypatch):
    # as a policy named twice in --policies: one column, not "rename the program"
    monkeypatch.chdir(good_program.parent)
    result = runner.invoke(app, ["compare", "--policies", "deepseek", "--program",
                                 str(good_program), "--program", "good.py", "--json",
                                 "--trace", str(small_trace), "--interval", "10", *SMALL_LAYOUT])
    assert list(_json(result)["policies"]) == ["deepseek", "good.py"]
    assert result.exit_code == 0


def test_compare_progress_reaches_its_total(small_trace, good_program, monkeypatch):
    import contextlib

    bars = []

    @contextlib.contextmanager
    def recording(description, total, enabled=True):
        bar = {"total": total, "done": 0}
        bars.append(bar)
        yield lambda: bar.update(done=bar["done"] + 1)

    monkeypatch.setattr("tape.cli.compare.progress_bar", recording)
    result = runner.invoke(app, ["compare", "--policies", "deepseek,vanilla", "--program",
                                 str(good_program), "--trace", str(small_trace), "--interval",
                                 "10", *SMALL_LAYOUT])
    assert result.exit_code == 0, result.output
    assert bars == [{"total": 3 * 3, "done": 3 * 3}]  # 3 columns x 3 window pairs


def test_compare_help_says_how_a_program_column_is_named_and_fails():
    result = runner.invoke(app, ["compare", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())
    assert "in a column named by its file name" in text
    assert "One that fails makes the exit code 1." in text


def test_compare_table_has_no_row_that_no_policy_has(small_trace):
    arguments = ["compare", "--policies", "deepseek", "--trace", str(small_trace), "--interval",
                 "10", *SMALL_LAYOUT]
    uniform = runner.invoke(app, [*arguments, "--dispatch", "uniform"])
    assert uniform.exit_code == 0, uniform.output
    assert "IB tokens" in uniform.output and "IB / fewest" not in uniform.output  # no bound
    assert "IB / fewest" in runner.invoke(app, arguments).output


@pytest.mark.parametrize("command, module", [("evolve", "openevolve"), ("tune", "optuna")])
def test_evolve_and_tune_without_their_extra_say_how_to_install_it(tmp_path, monkeypatch,
                                                                     command, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails as if not installed
    result = runner.invoke(app, [command, "--scoring", "2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    message = (f"error: tape {command} needs the evolve extra, but {module} is not installed; "
               "install it with pip install -e '.[evolve]' in a checkout of TAPE")
    assert result.output.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()
