"""TAPE_EPLB_POLICY as the engine plugins read it, and the vLLM version switch; no engine needed
(tests/engines/ runs the plugins inside the engines)."""

import pytest

from tape.engines import ENVIRONMENT_VARIABLE, engine_setting
from tape.engines.vllm_plugin import returns_phy2log_only


@pytest.fixture
def setting(monkeypatch):
    def read(value):
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, value)
        return engine_setting()

    return read


@pytest.mark.parametrize("value", ["", "  "])
def test_unset_or_empty_is_off(setting, value, monkeypatch):
    assert setting(value) is None
    monkeypatch.delenv(ENVIRONMENT_VARIABLE)
    assert engine_setting() is None


@pytest.mark.parametrize(("value", "policy", "params", "described"), [
    ("all", "tape", {"preset": "all"}, "policy tape, preset all"),
    ("balance-migration", "tape", {"preset": "balance-migration"},
     "policy tape, preset balance-migration"),
    ("fast:migration_weight=0.1", "tape", {"preset": "fast", "migration_weight": 0.1},
     "policy tape, preset fast, migration_weight=0.1"),
    ("tape:preset=balance", "tape", {"preset": "balance"}, "policy tape, preset balance"),
    ("tape", "tape", {}, "policy tape, preset all"),
    ("keep_margin=0.02", "tape", {"keep_margin": 0.02}, "policy tape, preset all, keep_margin=0.02"),
    ("deepseek", "deepseek", {}, "policy deepseek"),
])
def test_a_preset_or_a_policy_as_compare_takes_it(setting, value, policy, params, described):
    got = setting(value)
    assert got.rebalancer.policy == policy and got.rebalancer.params == params
    assert got.described == described and got.text == value


def test_one_rebalancer_per_setting_and_process(setting):
    assert setting("fast").rebalancer is setting(" fast ").rebalancer
    assert setting("all").rebalancer is not setting("fast").rebalancer


@pytest.mark.parametrize(("value", "expected"), [
    ("fastest", "'fastest' is neither a tape preset (balance, balance-migration, all, fast)"),
    ("tape:nope=1", "unknown tape parameter(s) nope"),
    ("nosuch:thing", "'nosuch' is neither a tape preset (balance"),
    ("tape:=", "cannot read"),
])
def test_a_bad_value_is_one_line_naming_the_variable(setting, value, expected):
    with pytest.raises(SystemExit) as stopped:
        setting(value)
    message = str(stopped.value)
    assert message.startswith(f"tape: {ENVIRONMENT_VARIABLE}={value!r}: ")
    assert expected in message and "\n" not in message


@pytest.mark.parametrize(("version", "phy2log_only"), [
    ("0.13.0", False), ("0.18.1", False), ("0.19.0", True), ("0.19.0rc1.dev5+gabc", True),
    ("0.33.0", True), ("1.0.0", True), ("", True),
])
def test_vllm_wants_phy2log_alone_from_0_19(version, phy2log_only):
    assert returns_phy2log_only(version) is phy2log_only


def test_unset_the_plugins_import_no_engine_and_change_nothing():
    """Engines call every installed plugin in every process: without the variable tape's do
    nothing, not even import the engine (or torch)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tape.engines import sglang_plugin, vllm_plugin\n"
        "vllm_plugin.register(); sglang_plugin.register()\n"
        "print(','.join(m for m in ('vllm', 'sglang', 'torch') if m in sys.modules))\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != ENVIRONMENT_VARIABLE}
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, env=environment).stdout.strip()
    assert loaded == ""


def test_the_settings_docs_serving_shows_are_accepted(setting):
    """Every TAPE_EPLB_POLICY=VALUE of docs/serving.md's command lines, and the values its text
    quotes as examples, make a rebalancer (the vLLM class and SGLang function behind them are
    tested inside the engines, tests/engines/)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    values = set(re.findall(r"TAPE_EPLB_POLICY=([\w:.=-]+) ", text))
    values |= {"fast:keep_margin=0.02", "tape:preset=all:migration_weight=0.1", "deepseek"}
    assert "all" in values and all(value in text for value in values)
    for value in values:
        assert setting(value).rebalancer is not None
