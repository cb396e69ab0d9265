"""One settings object for every command and the evaluator: defaults from the preset data, the
shared options declared once, and the TAPE_* variables that carry it to OpenEvolve's workers."""

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tape.cli.options import with_settings
from tape.errors import ConfigError
from tape.settings import SMALL_SYNTHETIC, Settings


@pytest.mark.parametrize("fields, layout", [
    # DeepSeek-V3 (256 experts in 8 groups) on 32 H800s (8 a node): 32 * (8 + 1) slots.
    ({}, (288, 8, 4, 32)),
    # Qwen3-30B-A3B (128 experts, no groups) on one node of 8: 8 * (16 + 1) slots, 1 group.
    ({"model": "qwen3-30b-a3b", "gpus": 8}, (136, 1, 1, 8)),
    # GB200 NVL72: 72 GPUs in one NVLink domain, 72 * (ceil(256 / 72) + 1) slots.
    ({"cluster": "gb200-nvl72", "gpus": 72, "synthetic_steps": 200}, (360, 8, 1, 72)),
    # Flags given win over the presets.
    ({"replicas": 320, "nodes": 8, "synthetic_steps": 200}, (320, 8, 8, 32)),
])
def test_the_layout_defaults_come_from_the_presets(fields, layout):
    settings = Settings(**fields).prepare().layout
    assert (settings.num_replicas, settings.num_groups, settings.num_nodes,
            settings.num_gpus) == layout


def test_the_environment_carries_every_setting(tmp_path):
    config = tmp_path / "presets.yaml"
    config.write_text("cluster:\n  preset: h100\n")
    settings = Settings(version="realistic", model="deepseek-v3", cluster="h200", config=config,
                        cache=False, timeout_s=5.0, budget_s=12.5, isolation="partial",
                        **SMALL_SYNTHETIC)
    environment = settings.to_environment()
    assert environment["TAPE_MODEL"] == "deepseek-v3"
    assert environment["TAPE_CONFIG"] == str(config.resolve())
    assert environment["TAPE_TRACE_CACHE"] == "0"
    assert Settings.from_environment(environment) == settings
    # The trace cache's and the plugins' variables are known, a typo is not.
    others = {"TAPE_CACHE_DIR": str(tmp_path), "TAPE_EPLB_POLICY": "all"}
    assert Settings.from_environment({**environment, **others}) == settings
    with pytest.raises(ConfigError, match="unknown evaluation variable.*TAPE_MODLE"):
        Settings.from_environment({"TAPE_MODLE": "kimi-k2"})
    with pytest.raises(ConfigError, match="TAPE_TRACE_CACHE='yes' is not 0 or 1"):
        Settings.from_environment({"TAPE_TRACE_CACHE": "yes"})


def test_the_shared_options_are_declared_once_with_settings_defaults():
    app = typer.Typer()
    seen = {}

    @app.command()
    @with_settings()
    def command(settings: Settings, extra: int = 1) -> None:
        seen["settings"], seen["extra"] = settings, extra

    @app.command()
    @with_settings(scoring=False, sandbox=False)
    def other(settings: Settings) -> None:
        seen["other"] = settings

    runner = CliRunner()
    assert runner.invoke(app, ["command"]).exit_code == 0
    assert seen["settings"] == Settings() and seen["extra"] == 1
    result = runner.invoke(app, ["command", "--model", "kimi-k2", "--scoring", "realistic",
                                 "--no-cache", "--timeout", "3", "--extra", "2"])
    assert result.exit_code == 0, result.output
    assert seen["settings"] == Settings(model="kimi-k2", version="realistic", cache=False,
                                        timeout_s=3.0)
    assert seen["extra"] == 2
    # A command without the sandbox's or the scoring's options does not take them.
    assert runner.invoke(app, ["other", "--timeout", "3"]).exit_code == 2
    assert runner.invoke(app, ["other", "--gpus", "8"]).exit_code == 0
    assert seen["other"] == Settings(gpus=8)


def test_paths_are_made_absolute_so_workers_and_resumes_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Settings(trace=Path("t.json")).trace == tmp_path / "t.json"
