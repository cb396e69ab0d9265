"""Inputs a hostile or careless user gives the API and the command line: one-line errors (or,
for vLLM's all-zero profile-run window, dropped), never a traceback or a silently wrong result."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import tape
from tape.cli import app
from tape.errors import PlacementError, TraceError
from tape.policies import PolicyError
from tape.serving import MAX_HISTORY_WINDOWS, Rebalancer
from tape.trace import load_trace

runner = CliRunner()
ARGUMENTS = (12, 2, 2, 4)  # num_replicas, num_groups, num_nodes, num_gpus


def test_weights_above_2_to_the_53_are_refused():
    weight = np.full((2, 8), 2.0**60)
    with pytest.raises(TraceError, match=r"is 1.153e\+18, more than 9007199254740992 \(2\*\*53"):
        tape.rebalance_experts(weight, *ARGUMENTS)
    tape.rebalance_experts(np.full((2, 8), 2.0**52), *ARGUMENTS)  # below: placed


def test_sparse_and_meta_tensors_are_one_line_errors():
    torch = pytest.importorskip("torch")
    dense = torch.arange(16, dtype=torch.float64).reshape(2, 8)
    with pytest.raises(TraceError, match=r"weight is a torch.sparse_coo tensor; pass a dense"):
        tape.rebalance_experts(dense.to_sparse(), *ARGUMENTS)
    with pytest.raises(TraceError, match="weight is a meta tensor, which holds no values"):
        tape.rebalance_experts(torch.empty((2, 8), device="meta"), *ARGUMENTS)
    with pytest.raises(TraceError, match="weight is a torch.sparse_coo tensor"):
        Rebalancer("deepseek")(dense.to_sparse(), *ARGUMENTS)
    previous = torch.zeros((2, 12), dtype=torch.int64).to_sparse()
    with pytest.raises(PlacementError, match="previous_phy2log is a torch.sparse_coo tensor"):
        tape.rebalance_experts(dense, *ARGUMENTS, previous_phy2log=previous)


def test_a_json_true_among_the_loads_is_not_read_as_1(tmp_path):
    path = tmp_path / "expert-load.json"
    path.write_text(json.dumps({"load_history": [
        {"logical_expert_load": [[1, 2, 3, 4, 5, 6, 7, 8]]},
        {"logical_expert_load": [[1, True, 3, 4, 5, 6, 7, 8]]},
    ]}))
    with pytest.raises(TraceError, match="step 1 holds non-numeric"):
        load_trace(path)


def test_the_rebalancer_refuses_an_empty_window_and_an_unbounded_history():
    rebalancer = Rebalancer("deepseek")
    for empty in (np.zeros((0, 2, 8)), np.zeros((2, 0))):
        with pytest.raises(TraceError, match="weight is empty"):
            rebalancer(empty, *ARGUMENTS)
    with pytest.raises(PolicyError, match=f"history_windows must be at most {MAX_HISTORY_WINDOWS}"):
        Rebalancer("deepseek", history_windows=10**9)


def test_the_rebalancer_keeps_no_all_zero_profile_run_window():
    rebalancer = Rebalancer("deepseek")
    rebalancer(np.zeros((2, 8)), *ARGUMENTS)  # vLLM's profile run: placed, not remembered
    assert rebalancer.windows_kept == 0
    rebalancer(np.arange(16.0).reshape(2, 8), *ARGUMENTS)
    assert rebalancer.windows_kept == 1


def test_tape_place_takes_a_one_step_trace(tmp_path):
    path = tmp_path / "one.npy"
    np.save(path, np.arange(16.0).reshape(1, 2, 8))
    result = runner.invoke(app, ["place", "--trace", str(path), "--replicas", "12", "--groups",
                                 "2", "--nodes", "2", "--gpus", "4", "--policy", "deepseek"])
    assert result.exit_code == 0, result.output


def test_a_config_model_shape_other_than_the_traces_is_an_error(tmp_path):
    trace = tmp_path / "trace.npy"
    np.save(trace, np.random.default_rng(0).random((40, 3, 8)))
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  num_layers: 10\n")
    arguments = ["compare", "--trace", str(trace), "--interval", "10", "--policies", "vanilla",
                 "--replicas", "12", "--groups", "2", "--nodes", "2", "--gpus", "4",
                 "--config", str(config)]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2
    assert "model num_layers is 10 but the trace's layers are 3" in result.stderr
    # The trace's shape, and routing that 8 experts in --groups 2 can serve (top-8 of 2 groups).
    config.write_text("model:\n  num_layers: 3\n  num_experts: 8\n  num_groups: 2\n"
                      "  topk_groups: 2\n")
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output



def test_tune_and_evolve_check_the_presets_model_shape_too(tmp_path):
    pytest.importorskip("optuna")
    trace = tmp_path / "trace.npy"
    np.save(trace, np.random.default_rng(0).random((40, 3, 8)))
    config = tmp_path / "presets.yaml"
    config.write_text("model:\n  num_layers: 5\n")
    result = runner.invoke(app, ["tune", "--trace", str(trace), "--interval", "10",
                                 "--replicas", "12", "--groups", "2", "--nodes", "2", "--gpus",
                                 "4", "--config", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "model num_layers is 5 but the trace's layers are 3" in result.stderr
    assert not (tmp_path / "out").exists()
