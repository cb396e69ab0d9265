"""The model preset drives every shape: synthetic trace, default layout, cost model, tables;
shapes that cannot work are one-line errors naming the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from tape import Layout
from tape.cli import app
from tape.errors import LayoutError, TraceError
from tape.layout import default_replicas
from tape.presets import model_preset, model_presets
from tape.synthetic import model_trace

runner = CliRunner()
SMALL_MODEL = ["--model", "gpt-oss-20b", "--interval", "300"]  # 24 layers x 32 experts


@pytest.mark.parametrize("experts, gpus", [(256, 32), (256, 64), (256, 144), (256, 320),
                                           (384, 64), (128, 16), (32, 8), (160, 32)])
def test_default_slots_are_one_more_a_gpu_than_the_experts_need(experts, gpus):
    slots = default_replicas(experts, gpus)
    assert slots % gpus == 0 and slots >= experts
    # one slot a GPU beyond the fewest that hold every expert
    assert slots // gpus - 1 == min(k for k in range(1, experts + 1) if k * gpus >= experts)
    assert default_replicas(256, 32) == 288  # the seed's layout stays the default


@pytest.mark.parametrize("name", model_presets())
def test_the_synthetic_trace_has_the_model_s_shape_and_routing(name):
    model = model_preset(name)
    loads = model_trace(name, num_steps=3, seed=1)
    assert loads.shape == (3, model.num_layers, model.num_experts)
    picks = loads.sum(axis=2)  # tokens * top_k, the same for every layer of a step
    assert np.all(picks == picks[:, :1])
    assert np.all(picks % model.top_k == 0)
    assert np.all(loads <= picks[..., None] / model.top_k)  # a token picks an expert at most once


def test_a_model_without_groups_refuses_groups_and_one_with_groups_takes_them():
    with pytest.raises(TraceError, match="qwen3-30b-a3b routes without expert groups"):
        model_trace("qwen3-30b-a3b", num_steps=2, num_groups=4)
    regrouped = model_trace("deepseek-v3", num_steps=2, num_groups=4)
    assert regrouped.shape == (2, 58, 256)


def test_layout_for_a_model_uses_its_groups_and_the_default_slots():
    layout = Layout.for_model(model_preset("kimi-k2"), num_gpus=64, num_nodes=8)
    assert (layout.num_replicas, layout.num_groups) == (448, 1)
    assert Layout.for_model(model_preset("deepseek-v3"), 32, 4) == Layout(288, 8, 4, 32)
    with pytest.raises(LayoutError, match=r"at least the number of experts \(384\).*the "
                       r"default: 448"):
        Layout.for_model(model_preset("kimi-k2"), num_gpus=64, num_replicas=320)


def _json(*arguments):
    result = runner.invoke(app, ["place", "--policy", "deepseek", *SMALL_MODEL, "--json",
                                 *arguments])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_model_and_cluster_drive_the_trace_the_layout_and_the_cost_model():
    data = _json("--gpus", "8", "--cluster", "b200")
    assert data["model"]["name"] == "gpt-oss-20b" and data["cluster"]["name"] == "b200"
    assert data["layout"] == {"replicas": 40, "groups": 1, "nodes": 1, "gpus": 8}
    assert "24 layers x 32 experts" in data["trace"]
    # an NVL72 rack is one node: 144 GPUs are two
    rack = _json("--gpus", "144", "--cluster", "gb200-nvl72")
    assert rack["layout"] == {"replicas": 288, "groups": 1, "nodes": 2, "gpus": 144}


def test_the_compare_table_names_the_model_and_the_cluster():
    result = runner.invoke(app, ["compare", "--policies", "deepseek", *SMALL_MODEL, "--gpus",
                                 "8", "--cluster", "h200"])
    assert result.exit_code == 0, result.output
    assert "gpt-oss-20b on h200" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--groups", "4"], ("error: --groups 4: the gpt-oss-20b model routes without expert "
                            "groups; leave --groups out")),
        (["--model", "llama-5"], "error: unknown model preset 'llama-5'; known: deepseek-v3"),
        (["--cluster", "a100"], "error: unknown cluster preset 'a100'; known: b200"),
        (["--replicas", "24"], ("error: --replicas (24) must be at least the number of experts "
                               "(32): every expert needs a slot (the least that fits 8 GPUs: "
                               "32; the default: 40)")),
        (["--replicas", "44"], ("error: --replicas (44) must be a multiple of --gpus (8): every "
                               "GPU holds the same number of slots (nearest: 40 or 48)")),
        (["--nodes", "3"], "error: --gpus (8) must be a multiple of --nodes (3)"),
        (["--gpus", "100", "--cluster", "gb200-nvl72"],
         ("error: --gpus 100 is not a multiple of the gb200-nvl72 preset's 72 GPUs per node; "
         "give --nodes")),
    ],
)
def test_a_shape_that_cannot_work_is_one_line_naming_the_fix(arguments, message):
    flags = {"--gpus": "8", **dict(zip(arguments[::2], arguments[1::2]))}
    result = runner.invoke(app, ["place", "--policy", "deepseek", *SMALL_MODEL,
                                 *[item for pair in flags.items() for item in pair]])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert message in text
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  preset: gpt-oss-20b\n  num_groups: 4\n",
         "num_groups and topk_groups are both numbers"),
        ("model:\n  preset: gpt-oss-20b\n  top_k: 0\n", "top_k must be positive"),
        ("cluster:\n  gpus_per_node: null\n", "gpus_per_node must be a number, got None"),
    ],
)
def test_a_config_model_or_cluster_that_cannot_work_is_one_line(tmp_path, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    result = runner.invoke(app, ["place", "--policy", "deepseek", "--interval", "300",
                                 "--gpus", "8", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert len(result.output.strip().splitlines()) == 1
