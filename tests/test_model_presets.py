"""Model and cluster presets: every shipped preset loads, is consistent and is sourced."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tape.errors import ConfigError
from tape.presets import cluster_preset, cluster_presets, load_config, model_preset, model_presets

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cost-model.md"


def test_the_issue_s_models_and_clusters_are_shipped():
    assert {"deepseek-v3", "kimi-k2", "qwen3-235b-a22b", "qwen3-30b-a3b", "gpt-oss-120b",
            "gpt-oss-20b", "glm-4.5", "glm-4.5-air", "llama-4-maverick"} <= set(model_presets())
    assert {"h800", "h100", "h200", "b200", "gb200-nvl72"} <= set(cluster_presets())


@pytest.mark.parametrize("name", model_presets())
def test_every_model_preset_is_consistent_and_sourced(name):
    model = model_preset(name)
    groups = model.layout_groups
    assert model.num_experts % groups == 0
    if model.num_groups is None:
        assert model.topk_groups is None and groups == 1
    else:
        assert 1 <= model.topk_groups <= model.num_groups
    assert model.top_k <= model.num_experts
    # the doc's table row names the preset and the config file it comes from
    row = next((line for line in DOCS.read_text().splitlines()
                if line.startswith(f"| `{name}`")), None)
    assert row is not None, f"docs/cost-model.md has no row for {name}"
    assert re.search(r"https://huggingface\.co/\S+/config\.json", row)
    assert f"| {model.num_experts} " in row and f"| {model.hidden_size} |" in row


@pytest.mark.parametrize("name", cluster_presets())
def test_every_cluster_preset_is_in_the_doc_s_table(name):
    cluster = cluster_preset(name)
    assert cluster.nvlink_bandwidth > cluster.ib_bandwidth
    header = next(line for line in DOCS.read_text().splitlines()
                  if line.startswith("| field | `h800`"))
    assert f"`{name}`" in header


def test_a_model_of_an_nvl72_rack_is_one_node_of_72_gpus():
    assert cluster_preset("gb200-nvl72").gpus_per_node == 72


@pytest.mark.parametrize(
    "text, message",
    [
        ("model:\n  num_groups: null\n", "num_groups and topk_groups are both numbers"),
        ("model:\n  num_groups: 7\n", r"num_groups \(7\) must divide num_experts \(256\)"),
        ("model:\n  topk_groups: 9\n", r"topk_groups \(9\) must be at most num_groups \(8\)"),
        ("model:\n  preset: gpt-oss-20b\n  top_k: 40\n", r"top_k \(40\) must be at most the 32"),
        ("model:\n  preset: llama-5\n", "unknown model preset 'llama-5'; known: deepseek-v3"),
        ("model:\n  num_layers: null\n", "num_layers must be a number, got None"),
    ],
)
def test_a_model_config_that_cannot_route_is_one_line_naming_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def test_a_model_without_groups_can_be_given_groups_by_a_config(tmp_path):
    path = tmp_path / "grouped.yaml"
    path.write_text("model:\n  preset: qwen3-30b-a3b\n  num_groups: 8\n  topk_groups: 4\n")
    model, _ = load_config(path)
    assert (model.num_groups, model.topk_groups, model.layout_groups) == (8, 4, 8)
