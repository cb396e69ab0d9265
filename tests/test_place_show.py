"""`tape place --show LAYER`: the experts each GPU holds, node by node."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tape.assignment import gpu_assignment_text, gpu_experts
from tape.cli import app
from tape.layout import Layout
from tape.placement import Placement

runner = CliRunner()
FLAGS = ["--replicas", "12", "--groups", "2", "--nodes", "2", "--gpus", "4", "--interval", "10"]
LAYOUT = Layout(num_replicas=12, num_groups=2, num_nodes=2, num_gpus=4)



def test_the_text_lists_each_gpus_experts_under_its_node():
    phy2log = np.array([[7, 0, 3, 1, 2, 2, 4, 5, 6, 0, 1, 4]])
    text = gpu_assignment_text(Placement(phy2log, 8), LAYOUT, 0)
    assert text == ("node 0\n  GPU 0: 0 3 7\n  GPU 1: 1 2 2\n\n"
                    "node 1\n  GPU 2: 4 5 6\n  GPU 3: 0 1 4")


def test_wide_ids_line_up():
    layout = Layout(num_replicas=24, num_groups=1, num_nodes=1, num_gpus=12)
    phy2log = np.arange(24)[None] % 12
    lines = gpu_assignment_text(Placement(phy2log, 12), layout, 0).splitlines()
    assert lines[1] == "  GPU  0:  0  1" and lines[-1] == "  GPU 11: 10 11"


def test_place_shows_the_layer_it_writes(small_trace, tmp_path):
    output = tmp_path / "placement.json"
    result = runner.invoke(app, ["place", "--trace", str(small_trace), "--show", "1", "--output",
                                 str(output), *FLAGS])
    assert result.exit_code == 0, result.output
    written = Placement(json.loads(output.read_text())["physical_to_logical_map"], 8)
    assert gpu_assignment_text(written, LAYOUT, 1) in result.output
    assert "experts each GPU holds on layer 1 (tape)" in result.output


def test_json_carries_the_assignment(small_trace):
    result = runner.invoke(app, ["place", "--trace", str(small_trace), "--show", "2", "--json",
                                 "--policy", "deepseek", *FLAGS])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["show"]["layer"] == 2
    experts = data["show"]["gpu_experts"]
    assert len(experts) == 4 and all(len(gpu) == 3 for gpu in experts)
    assert {e for gpu in experts for e in gpu} == set(range(8))


def test_a_layer_past_the_last_is_one_line(small_trace):
    result = runner.invoke(app, ["place", "--trace", str(small_trace), "--show", "3", *FLAGS])
    assert result.exit_code == 2
    assert "--show 3: the placement has layers 0 to 2" in result.output
    assert "Traceback" not in result.output


def test_gpu_experts_is_per_gpu_and_sorted():
    placement = Placement(np.array([[5, 1, 0, 7, 6, 2, 3, 4, 1, 0, 2, 3]]), 8)
    assert gpu_experts(placement, LAYOUT, 0) == [[0, 1, 5], [2, 6, 7], [1, 3, 4], [0, 2, 3]]


@pytest.mark.parametrize("where", ["last", "before another option"])
def test_a_bare_show_shows_the_first_layer(small_trace, where):
    arguments = ["place", "--trace", str(small_trace), "--policy", "deepseek", *FLAGS, "--json"]
    arguments = [*arguments, "--show"] if where == "last" else ["place", "--show", *arguments[1:]]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["show"]["layer"] == 0
