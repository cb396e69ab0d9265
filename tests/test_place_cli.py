"""`tape place`: one placement from a trace's newest window, in the file SGLang reads."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tape.api import place
from tape.cli import app
from tape.cli.place import MAP_KEY
from tape.costmodel import migration_metrics
from tape.dispatch import fewest_ib_tokens
from tape.layout import Layout
from tape.placement import Placement
from tape.presets import load_config
from tape.trace import window_loads

runner = CliRunner()
LAYOUT = Layout(num_replicas=12, num_groups=2, num_nodes=2, num_gpus=4)
FLAGS = ["--replicas", "12", "--groups", "2", "--nodes", "2", "--gpus", "4", "--interval", "10"]


@pytest.fixture()
def trace(tmp_path):
    """[40, 3, 8] steps: four 10-step windows."""
    rng = np.random.default_rng(0)
    popularity = rng.pareto(1.5, size=(3, 8)) + 0.1
    path = tmp_path / "trace.npy"
    np.save(path, rng.poisson(popularity * 20, size=(40, 3, 8)).astype(float))
    return path


def _place(*args):
    return runner.invoke(app, ["place", *args, *FLAGS])


def _written(path):
    return np.array(json.loads(path.read_text())[MAP_KEY])


def test_it_writes_the_policys_placement_for_the_newest_window(trace, tmp_path):
    output = tmp_path / "placement.json"
    result = _place("--trace", str(trace), "--output", str(output))
    assert result.exit_code == 0, result.output
    windows = window_loads(np.load(trace), 10)
    expected = place(windows[-1], LAYOUT, "tape", history=windows[:-1])
    np.testing.assert_array_equal(_written(output), expected.phy2log)
    Placement(_written(output), 8).validate(LAYOUT, 3)  # a whole placement, as SGLang needs
    assert "deepseek" in result.output and f"wrote {output}" in result.output
    # one layer a line: a file a person can read and diff
    assert len(output.read_text().splitlines()) == 3 + 4  # braces, key, 3 layers, bracket


def test_previous_is_kept_where_it_pays_and_the_moves_are_counted(trace, tmp_path):
    windows = window_loads(np.load(trace), 10)
    in_force = place(windows[0], LAYOUT, "vanilla")
    previous = tmp_path / "in-force.json"
    previous.write_text(json.dumps({MAP_KEY: in_force.phy2log.tolist()}))
    result = _place("--trace", str(trace), "--previous", str(previous), "--policy", "min-moves",
                    "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["placements"]
    assert list(report) == ["in force", "min-moves", "deepseek"]
    expected = place(windows[-1], LAYOUT, "min-moves", previous=in_force, history=windows[:-1])
    moves = migration_metrics(in_force, expected, LAYOUT, *load_config(None, model=None,
                                                                         cluster=None))
    assert report["min-moves"]["moved_experts"] == moves["moved_experts"]
    assert report["min-moves"]["moved_experts"] <= report["deepseek"]["moved_experts"]
    assert "moved_experts" not in report["in force"]
    fewest = fewest_ib_tokens(windows[-1], LAYOUT)  # no placement sends fewer across nodes
    for values in report.values():
        assert values["ib_tokens_over_bound"] == pytest.approx(values["ib_tokens"] / fewest)
        assert values["ib_tokens_over_bound"] >= 1 - 1e-9


def test_the_file_round_trips_through_previous(trace, tmp_path):
    first = tmp_path / "first.json"
    assert _place("--trace", str(trace), "--output", str(first)).exit_code == 0
    result = _place("--trace", str(trace), "--previous", str(first), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["placements"]["in force"]["gpu_balancedness"] > 0


def test_an_existing_output_is_replaced_only_with_overwrite(trace, tmp_path):
    output = tmp_path / "placement.json"
    output.write_text("keep me")
    result = _place("--trace", str(trace), "--output", str(output))
    assert result.exit_code == 2
    assert "exists; pass --overwrite" in result.output
    assert output.read_text() == "keep me"
    assert _place("--trace", str(trace), "--output", str(output), "--overwrite").exit_code == 0
    assert _written(output).shape == (3, 12)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ('{"phy2log": []}', "has no 'physical_to_logical_map'"),
        (json.dumps({MAP_KEY: [[0, 1, 2]]}), "--previous"),
        (json.dumps({MAP_KEY: [[0] * 12] * 3}), "--previous"),  # experts without a slot
        (json.dumps({MAP_KEY: [list(range(8)) + [0] * 6] * 3}), "expected --replicas = 12"),
    ],
)
def test_a_bad_previous_file_is_a_one_line_error(trace, tmp_path, content, message):
    previous = tmp_path / "previous.json"
    previous.write_text(content)
    result = _place("--trace", str(trace), "--previous", str(previous))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_bad_output_and_missing_previous_fail_before_any_work(tmp_path):
    for args, message in [
        (["--output", str(tmp_path)], "is a folder"),
        (["--previous", str(tmp_path / "none.json")], "is not a file"),
        (["--policy", "nope"], "unknown policy 'nope'"),
    ]:
        result = _place("--trace", str(tmp_path / "missing.npy"), *args)
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize("name", ["placement", "placement.txt", "placement.JSON"])
def test_an_output_sglang_would_not_read_as_a_file_is_refused(trace, tmp_path, name):
    """SGLang's --init-expert-location reads a file only if its name ends in .json (or .pt);
    any other value it parses as JSON text, so the server would fail to start."""
    result = _place("--trace", str(trace), "--output", str(tmp_path / name))
    assert result.exit_code == 2 and "must end in .json" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("flag", ["--output", "--previous"])
def test_an_empty_path_is_a_usage_error_not_the_current_folder(trace, flag):
    """--output "$FILE" with FILE unset named the current folder ('--output . is a folder')."""
    result = _place("--trace", str(trace), flag, "")
    assert result.exit_code == 2
    assert "an empty path; give a file name" in result.output


def test_json_says_what_was_placed_and_on_what(trace, tmp_path):
    """--json alone tells a script the cluster, the presets and the files it was given."""
    previous = tmp_path / "in-force.json"
    assert _place("--trace", str(trace), "--output", str(previous)).exit_code == 0
    result = _place("--trace", str(trace), "--previous", str(previous), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layout"] == {"replicas": 12, "groups": 2, "nodes": 2, "gpus": 4}
    assert report["interval"] == 10 and report["history_windows"] == 3
    assert report["dispatch"] == "locality" and report["cluster"]["name"] == "h800"
    assert report["model"]["name"] == "deepseek-v3"
    assert report["previous"] == str(previous) and report["output"] is None


def test_one_window_is_enough(tmp_path):
    # place does not replay: the newest window alone, no history (compare needs two)
    path = tmp_path / "one.npy"
    np.save(path, np.random.default_rng(1).poisson(20.0, size=(5, 3, 8)).astype(float))
    output = tmp_path / "placement.json"
    result = _place("--trace", str(path), "--output", str(output))
    assert result.exit_code == 0, result.output
    weight = np.load(path).sum(axis=0)
    np.testing.assert_array_equal(_written(output), place(weight, LAYOUT, "tape").phy2log)


def test_dense_layers_lead_the_file_with_trivial_rows_and_are_read_back(trace, tmp_path):
    # SGLang wants a row for every model layer: DeepSeek-V3's 3 dense layers before its 58
    output = tmp_path / "placement.json"
    result = _place("--trace", str(trace), "--output", str(output), "--dense-layers", "2")
    assert result.exit_code == 0, result.output
    rows = _written(output)
    assert rows.shape == (2 + 3, 12)
    np.testing.assert_array_equal(rows[:2], [np.arange(12) % 8] * 2)  # SGLang's init_trivial
    windows = window_loads(np.load(trace), 10)
    expected = place(windows[-1], LAYOUT, "tape", history=windows[:-1])
    np.testing.assert_array_equal(rows[2:], expected.phy2log)
    again = _place("--trace", str(trace), "--previous", str(output), "--dense-layers", "2",
                   "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.stdout)
    assert report["dense_layers"] == 2 and "in force" in report["placements"]
    wrong = _place("--trace", str(trace), "--previous", str(output))  # rows 5, layers 3
    assert wrong.exit_code == 2  # the flag forgotten: the error says which to give
    assert "has 5 rows, the trace 3 layers" in wrong.output
    assert "give --dense-layers 2" in wrong.output
    short = _place("--trace", str(trace), "--previous", str(output), "--dense-layers", "1")
    assert short.exit_code == 2
    assert "has 5 rows; expected --dense-layers 1 + the trace's 3 layers = 4" in short.output
    huge = _place("--trace", str(trace), "--dense-layers", str(10**9))
    assert huge.exit_code == 2 and "--dense-layers must be at most 1024" in huge.output
