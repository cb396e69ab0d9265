"""`tape evolve`: settings, prompts, configs, the sandboxed evaluator, and real OpenEvolve runs
against a scripted local LLM (offline)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("openevolve")

from fake_llm import ScriptedLLM, diff_reply
from openevolve.config import Config
from openevolve.utils.code_utils import parse_evolve_blocks

from tape.errors import ConfigError, TapeError
from tape.evolution import configs, evaluator, prompts, run
from tape.files import require_new_folder
from tape.policies import get_policy
from tape.protocol import replay
from tape.settings import ENVIRONMENT, SMALL_SYNTHETIC, Settings
from tape.synthetic import SURGES, synthetic_trace
from tape.trace import window_loads

SMALL = Settings(version=2, **SMALL_SYNTHETIC)


@pytest.fixture(autouse=True)
def clean_tape_environment(monkeypatch):
    """Each test starts without TAPE_* variables and leaves none behind."""
    for name in list(os.environ):
        if name.startswith("TAPE_"):
            monkeypatch.delenv(name)
    yield
    for name in ENVIRONMENT.values():
        os.environ.pop(name, None)


def load_module(path: Path, name: str = "program_under_test"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- settings ------------------------------------------------------------------------------------


def test_settings_round_trip_through_the_environment():
    settings = Settings(version="realistic", trace=Path("t.json"), interval=50,
                                  timeout_s=2.5, cluster="h100", **SMALL_SYNTHETIC)
    environment = settings.to_environment()
    assert environment["TAPE_VERSION"] == "realistic"
    assert environment["TAPE_TRACE"] == str(Path("t.json").resolve())
    assert environment["TAPE_TIMEOUT"] == "2.5"
    assert "TAPE_WINDOWS" not in environment  # unset fields are left out
    assert Settings.from_environment(environment) == settings


@pytest.mark.parametrize(
    ("environment", "reason"),
    [
        ({"TAPE_VERISON": "2"}, "unknown evaluation variable.*TAPE_VERISON"),
        ({"TAPE_INTERVAL": "ten"}, "TAPE_INTERVAL='ten' is not an integer"),
        ({"TAPE_VERSION": "5"}, "unknown version '5'"),
        ({"TAPE_TRACE": "a.json", "TAPE_WINDOWS": "w.npy"}, "either a trace or a windows file"),
        ({"TAPE_REPLICAS": "50", "TAPE_GPUS": "8"}, "multiple of num_gpus"),
        ({"TAPE_DISPATCH": "random"}, "unknown dispatch policy 'random'"),
        ({"TAPE_SEED": "-1"}, "seed must be a non-negative integer"),
        ({"TAPE_SYNTHETIC_MODEL": "bursty"}, "unknown synthetic model 'bursty'; known: calibrated"),
        ({"TAPE_SYNTHETIC_MODEL": "surges", "TAPE_TRACE": "a.json"},
         "--synthetic-model applies to the synthetic trace, not to --trace"),
        ({"TAPE_SEED": "3", "TAPE_TRACE": "a.json"}, "--seed applies to the synthetic trace, not to --trace"),
    ],
)
def test_bad_settings_are_rejected_with_the_reason(environment, reason):
    # TapeError, not any Exception: a KeyError or TypeError with a like message must fail here.
    with pytest.raises(TapeError, match=reason):
        Settings.from_environment(environment)


def test_the_synthetic_model_reaches_the_windows(tmp_path):
    small = {**SMALL_SYNTHETIC, "synthetic_steps": 300}
    surges = Settings.from_environment(
        {**Settings(**small).to_environment(), "TAPE_SYNTHETIC_MODEL": "surges"})
    assert surges.synthetic_model == "surges"
    assert "surges model" in surges.describe_source()
    expected = window_loads(synthetic_trace(
        num_steps=300, num_layers=4, num_experts=32, num_groups=4, seed=0, model=SURGES), 100)
    assert np.array_equal(surges.windows(), expected)
    assert not np.array_equal(Settings(**small).windows(), expected)
    # tape evolve hands its workers the same settings with the windows in a file.
    path = tmp_path / "windows.npz"
    surges.save_windows(path)
    worker = dataclasses.replace(surges, trace=None, windows_file=path)
    assert np.array_equal(worker.windows(), expected)


def test_an_output_folder_must_be_new_or_empty_and_not_a_file(tmp_path):
    require_new_folder(tmp_path / "new")
    require_new_folder(tmp_path)
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match="already holds files; choose another --out"):
        require_new_folder(tmp_path)
    with pytest.raises(ConfigError, match=r"old.txt is a file, not a folder; give a folder \(new "
                       r"or empty\) as --out"):
        require_new_folder(tmp_path / "old.txt")


def test_a_config_is_found_by_path_or_shipped_name(tmp_path, monkeypatch):
    assert configs.find_config("local") == configs.shipped_config("local")
    own = tmp_path / "mine.yaml"
    own.write_text("max_iterations: 3\n")
    assert configs.find_config(str(own)) == own
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        configs.find_config("missing.yaml")
    with pytest.raises(ConfigError, match="no shipped config 'gemeni'; shipped: gemini, local"):
        configs.find_config("gemeni")
    monkeypatch.chdir(tmp_path)
    for name in ("runs", "runs.yaml", "local"):
        (tmp_path / name).mkdir()
    for given in ("runs", str(tmp_path / "runs"), "runs.yaml"):
        with pytest.raises(ConfigError, match=r"runs(\.yaml)? is a folder, not a YAML file"):
            configs.find_config(given)
    assert configs.find_config("local") == configs.shipped_config("local")  # not ./local/
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        configs.resolve_config(tmp_path / "runs", version=2, iterations=None,
                               llm=configs.LLMChoice(), full_rewrite=False, environ={})


def test_configure_sets_the_variables_and_clears_the_others():
    os.environ["TAPE_TRACE"] = "old.json"
    settings = evaluator.configure(version=3, **SMALL_SYNTHETIC)
    assert os.environ["TAPE_VERSION"] == "3"
    assert "TAPE_TRACE" not in os.environ
    assert Settings.from_environment() == settings


def test_windows_are_the_summed_steps_of_the_synthetic_trace():
    from tape.synthetic import synthetic_trace

    loads = synthetic_trace(num_steps=600, num_layers=4, num_experts=32, num_groups=4, seed=0)
    windows = SMALL.windows()
    assert windows.shape == (6, 4, 32)
    np.testing.assert_allclose(windows[2], loads[200:300].sum(axis=0))
    shorter = Settings(**{**SMALL_SYNTHETIC, "synthetic_steps": 550})
    assert shorter.window_steps() == (100, 100, 100, 100, 100, 50)  # the last window is shorter


def test_a_windows_file_gives_back_the_windows_and_their_steps(tmp_path):
    shorter = Settings(**{**SMALL_SYNTHETIC, "synthetic_steps": 550})
    shorter.save_windows(tmp_path / "w.npz")
    saved = Settings(**{**SMALL_SYNTHETIC, "windows_file": tmp_path / "w.npz"})
    np.testing.assert_array_equal(saved.windows(), shorter.windows())
    assert saved.window_steps() == shorter.window_steps()


# -- prompts and the initial program -----------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 3, 4, "realistic"])
def test_the_system_message_states_the_versions_objective(version):
    message = prompts.system_message(version)
    assert "{objective}" not in message
    assert "rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)" in message
    metrics = prompts.version_metrics(version)
    for metric in metrics:
        assert f"- {metric}:" in message
    formula = " ".join(message.split("maximize combined_score = ", 1)[1].split())
    if version == "realistic":
        assert formula.startswith("the mean over pairs of (steps * balanced_compute_time_s)")
    else:
        formula = formula.split(".")[0]
        assert all(metric in formula for metric in metrics)
        assert formula.endswith(f"/ {len(metrics)}")


def test_the_initial_program_has_one_evolve_block_and_the_seed_contract(tmp_path):
    text = prompts.initial_program_text()
    assert len(parse_evolve_blocks(text)) == 1
    module = load_module(write(tmp_path, "initial.py", text))
    assert callable(module.rebalance_experts)


def test_the_initial_program_matches_deepseeks_slot_loads():
    """The initial program is DeepSeek EPLB's policy: the same largest slot load per layer as the
    `deepseek` policy, on a hierarchical layout and on a global one (groups % nodes != 0)."""
    module = load_module(Path(prompts.__file__).parent.parent / "evolve_assets" /
                         "initial_program.py")
    weight = SMALL.windows()[0]
    for settings in (SMALL, Settings(**{**SMALL_SYNTHETIC, "nodes": 8, "groups": 4})):
        layout = settings.layout()
        from tape.placement import Placement

        ours = Placement.from_maps(*module.rebalance_experts(
            weight, layout.num_replicas, layout.num_groups, layout.num_nodes, layout.num_gpus
        )).validate(layout, weight.shape[0])
        reference = get_policy("deepseek")(weight, layout)
        np.testing.assert_allclose(ours.slot_loads(weight).max(axis=1),
                                   reference.slot_loads(weight).max(axis=1))


# -- the evaluator -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 2, 3, 4, "realistic"])
def test_evaluate_scores_the_initial_program_under_each_version(version):
    evaluator.configure(version=version, **SMALL_SYNTHETIC)
    path = Path(prompts.__file__).parent.parent / "evolve_assets" / "initial_program.py"
    result = evaluator.evaluate(str(path))
    assert result.artifacts == {}
    metrics = result.metrics
    assert set(metrics) == {"combined_score", "avg_raw_time", *prompts.version_metrics(version)}
    assert metrics["avg_raw_time"] > 0
    if version == "realistic":  # a fraction of ideal throughput
        assert 0 < metrics["combined_score"] < 1
        assert metrics["balanced_compute_time_s"] < metrics["step_time_s"]
    else:
        parts = [metrics[name] for name in prompts.version_metrics(version)]
        assert metrics["combined_score"] == pytest.approx(sum(parts) / len(parts))
        assert metrics["combined_score"] > 0


def test_candidate_metrics_are_the_versions_metrics_and_zero_for_a_failed_program():
    from tape.protocol import ProgramScore

    measured = {"combined_score": 0.5, "balancedness_score": 0.8, "speed_score": 0.2,
                "communication_score": 0.3, "avg_raw_time": 0.01, "moved_experts": 7.0}
    assert evaluator.candidate_metrics(ProgramScore(metrics=measured), 0) == {
        "combined_score": 0.5, "balancedness_score": 0.8, "speed_score": 0.2,
        "avg_raw_time": 0.01}
    # One pair has no migration: the realistic version leaves migration_seconds out.
    realistic = {"combined_score": 0.4, "gpu_balancedness": 0.9, "locality_score": 0.7,
                 "step_time_s": 2.0, "balanced_compute_time_s": 1.0, "avg_raw_time": 0.01}
    assert evaluator.candidate_metrics(ProgramScore(metrics=realistic), "realistic") == realistic
    failed = evaluator.candidate_metrics(ProgramScore.failed("it broke"), 4)
    assert failed == dict.fromkeys(("combined_score", "balancedness_score", "speed_score",
                                    "communication_score", "weight_copy_score"), 0.0)


SLEEPS = (
    "import time\n\ndef rebalance_experts(w, s, g, n, gpus):\n    while True:\n"
    "        time.sleep(1)\n"
)
EATS = (
    "import numpy as np\n\ndef rebalance_experts(w, s, g, n, gpus):\n    hoard = []\n"
    "    while True:\n        hoard.append(np.ones(2**24))\n"
)
RAISES = "def rebalance_experts(w, s, g, n, gpus):\n    return 1 / 0\n"
GARBAGE = "def rebalance_experts(w, s, g, n, gpus):\n    return 'placement'\n"
BAD_PROGRAMS = {
    "sleeps forever": (SLEEPS, "timed out after 1 s"),
    "eats memory": (EATS, "exceeded the memory limit of 300 MB"),
    "raises": (RAISES, "raised ZeroDivisionError: division by zero"),
    "returns garbage": (GARBAGE, "returned a str, expected a tuple"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROGRAMS))
def test_a_failing_candidate_scores_zero_with_the_reason(tmp_path, case):
    text, reason = BAD_PROGRAMS[case]
    evaluator.configure(timeout_s=1.0, memory_mb=300, **SMALL_SYNTHETIC)
    start = time.monotonic()
    result = evaluator.evaluate(str(write(tmp_path, "candidate.py", text)))
    assert time.monotonic() - start < 30
    assert set(result.metrics.values()) == {0.0}
    assert "combined_score" in result.metrics
    assert reason in result.artifacts["failure_reason"]
    assert "\n" not in result.artifacts["failure_reason"]


# A cheater: it looks through its callers' frames and the garbage collector for the windows that
# the evaluator holds, to return a placement fitted to the window it will be scored on.
CHEATER = """
import gc
import sys

import numpy as np


def later_windows(weight):
    seen = []
    frame = sys._getframe()
    while frame is not None:
        seen.extend(frame.f_locals.values())
        frame = frame.f_back
    seen.extend(gc.get_objects())
    return [
        value for value in seen
        if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[1:] == weight.shape
    ]


def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    found = later_windows(np.asarray(weight))
    if not found:
        raise LookupError("no later window found")
    raise NotImplementedError("found the windows: would fit the next one")
"""


def test_a_candidate_that_inspects_the_callers_frames_finds_nothing_and_scores_zero(tmp_path):
    evaluator.configure(**SMALL_SYNTHETIC)
    path = write(tmp_path, "cheater.py", CHEATER)
    result = evaluator.evaluate(str(path))
    assert result.metrics["combined_score"] == 0.0
    assert "raised LookupError: no later window found" in result.artifacts["failure_reason"]
    # Called in the evaluator's own process, as published runs did, the same search finds
    # every window in the protocol's frames: only the sandbox keeps them out of reach.
    cheater = load_module(path, "cheater_in_process")
    windows = SMALL.windows()
    found = []

    def in_process(weight, previous, history):
        found.extend(cheater.later_windows(weight))
        return get_policy("deepseek")(weight, SMALL.layout()), 1e-3

    replay(in_process, windows)
    assert any(array.shape == windows.shape for array in found)


# -- configs and the API key ---------------------------------------------------------------------


@pytest.mark.parametrize("name", configs.shipped_config_names())
def test_every_shipped_config_loads(name):
    path = configs.shipped_config(name)
    raw = yaml.safe_load(path.read_text())
    assert "api_key" not in json.dumps(raw)  # keys come from the environment only
    assert raw["evaluator"]["cascade_evaluation"] is False
    direct = Config.from_yaml(path)  # OpenEvolve's own loader accepts it
    assert direct.llm.models and direct.diff_based_evolution
    for version in (0, 2, 3, 4, "realistic"):  # every config serves every version
        resolved = configs.resolve_config(
            path, version=version, iterations=7, llm=configs.LLMChoice(), full_rewrite=False,
            environ={"OPENAI_API_KEY": "sk-test"},
        )
        assert resolved.config.prompt.system_message == prompts.system_message(version)
    assert resolved.config.max_iterations == 7
    assert all(model.api_key == "sk-test" for model in resolved.config.llm.models)
    assert "sk-test" not in yaml.safe_dump(resolved.saved)
    bound = run._evaluation_bound(Settings())
    assert resolved.config.evaluator.timeout >= bound


def test_the_shipped_configs_are_gemini_and_a_local_server():
    assert {"gemini", "local"} <= set(configs.shipped_config_names())
    gemini = Config.from_yaml(configs.shipped_config("gemini"))
    assert "generativelanguage.googleapis.com" in gemini.llm.api_base
    assert all(model.name.startswith("gemini") for model in gemini.llm.models)
    local = yaml.safe_load(configs.shipped_config("local").read_text())
    assert local["llm"]["api_base"].startswith("http://localhost")


def resolve(tmp_path, config: dict, environ: dict, **choice):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return configs.resolve_config(path, version=2, iterations=None, llm=configs.LLMChoice(**choice),
                              full_rewrite=False, environ=environ)


REMOTE = {"llm": {"api_base": "https://api.example.com/v1", "models": [{"name": "m"}]}}
LOCAL = {"llm": {"api_base": "http://localhost:8000/v1", "models": [{"name": "m"}]}}


def test_no_key_for_a_remote_endpoint_is_a_one_line_error_naming_the_variable(tmp_path):
    with pytest.raises(ConfigError) as caught:
        resolve(tmp_path, REMOTE, {})
    message = str(caught.value)
    assert "\n" not in message
    assert "no API key: set OPENAI_API_KEY" in message and "--api-base" in message
    with pytest.raises(ConfigError, match="no API key: set MY_KEY"):
        resolve(tmp_path, REMOTE, {}, api_key_env="MY_KEY")


def test_the_key_comes_from_the_named_variable(tmp_path):
    resolved = resolve(tmp_path, REMOTE, {"MY_KEY": "k1", "OPENAI_API_KEY": "k2"},
                       api_key_env="MY_KEY")
    assert resolved.config.llm.models[0].api_key == "k1" and resolved.key_variable == "MY_KEY"
    referenced = {"llm": {**REMOTE["llm"], "api_key": "${GEMINI_KEY}"}}
    resolved = resolve(tmp_path, referenced, {"GEMINI_KEY": "k3"})
    assert resolved.config.llm.models[0].api_key == "k3"
    assert resolved.saved["llm"].get("api_key") is None


def test_a_local_endpoint_needs_no_key(tmp_path):
    resolved = resolve(tmp_path, LOCAL, {})
    assert resolved.config.llm.models[0].api_key == configs.LOCAL_KEY_PLACEHOLDER
    resolved = resolve(tmp_path, REMOTE, {}, api_base="http://127.0.0.1:9/v1")
    assert resolved.config.llm.models[0].api_base == "http://127.0.0.1:9/v1"


def test_a_key_written_in_the_config_is_refused(tmp_path):
    config = {"llm": {**REMOTE["llm"], "api_key": "sk-literal"}}
    with pytest.raises(ConfigError, match="holds an API key"):
        resolve(tmp_path, config, {"OPENAI_API_KEY": "k"})


@pytest.mark.parametrize(("config", "message"), [
    ({"llm": 5}, "section llm of .* must be a mapping of settings .*got a number \\(5\\)"),
    ({"llm": [1, 2]}, "section llm of .* must be a mapping of settings .*got a list"),
    ({"llm": {"models": 5}}, "llm: models of .* must be a list of models"),
    ({"llm": {"models": [3]}}, "llm: models of .* must be a list of models"),
    ({"prompt": 3}, "section prompt of .* must be a mapping"),
])
def test_sections_of_the_wrong_type_are_one_line_errors(tmp_path, config, message):
    with pytest.raises(ConfigError, match=message):
        resolve(tmp_path, config, {})


def test_an_api_base_that_is_not_a_url_says_so(tmp_path):
    with pytest.raises(ConfigError, match="--api-base notaurl is not an http\\(s\\) URL"):
        resolve(tmp_path, REMOTE, {}, api_base="notaurl")


def test_unknown_config_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) timeuot in section evaluator"):
        resolve(tmp_path, {**LOCAL, "evaluator": {"timeuot": 5}}, {})
    with pytest.raises(ConfigError, match="unknown key"):
        resolve(tmp_path, {**LOCAL, "max_iteration": 5}, {})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"llm:\n  models: [{name: m}\nmax_iterations: 3\n",
         ("is not valid YAML: line 3, column 1: expected ',' or ']', but got '<scalar>' (while "
          "parsing a flow sequence that starts at line 2, column 11)")),
        (b"max_iterations: 3\xff\n", "is not UTF-8 text"),
    ],
)
def test_an_unreadable_config_is_one_line_naming_the_place(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        configs.resolve_config(path, version=2, iterations=None, llm=configs.LLMChoice(),
                               full_rewrite=False, environ={})
    assert str(caught.value) == f"OpenEvolve config {path} {message}"


@pytest.mark.parametrize(
    ("change", "name", "value"),
    [
        ({"max_iterations": 0}, "max_iterations", "0"),
        ({"max_iterations": True}, "max_iterations", "True"),
        ({"checkpoint_interval": 0}, "checkpoint_interval", "0"),
        ({"database": {"num_islands": 0}}, "database.num_islands", "0"),
        ({"database": {"population_size": -1}}, "database.population_size", "-1"),
        ({"evaluator": {"parallel_evaluations": 0}}, "evaluator.parallel_evaluations", "0"),
    ],
)
def test_counts_below_one_in_a_config_are_one_line_errors(tmp_path, change, name, value):
    # OpenEvolve would run no iteration, or fail mid-run with a traceback (0 workers: a
    # ValueError; 0 islands or checkpoint interval: a ZeroDivisionError).
    with pytest.raises(ConfigError) as caught:
        resolve(tmp_path, {**LOCAL, **change}, {})
    assert str(caught.value) == (f"{name} in OpenEvolve config {tmp_path / 'config.yaml'} must be a "
                                 f"whole number of at least 1, got {value}")


def test_the_command_line_overrides_the_config(tmp_path):
    config = {**LOCAL, "prompt": {"system_message": "My own instructions."}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    resolved = configs.resolve_config(
        path, version=0, iterations=3, llm=configs.LLMChoice(models=("a", "b")), full_rewrite=True,
        environ={},
    )
    assert [model.name for model in resolved.config.llm.models] == ["a", "b"]
    assert resolved.config.diff_based_evolution is False
    assert resolved.config.prompt.system_message == "My own instructions."


# -- real OpenEvolve runs against a scripted LLM --------------------------------------------------

WEAK_PROGRAM = '''
"""A weak but correct placement: spare slots go round-robin, whatever the load."""

import numpy as np

# EVOLVE-BLOCK-START


def balance(weight, num_replicas, num_groups, num_nodes, num_gpus):
    layers, experts = weight.shape
    phy2log = np.tile(np.arange(num_replicas) % experts, (layers, 1))
    return maps(phy2log, experts)


# EVOLVE-BLOCK-END


def maps(phy2log, experts):
    layers, slots = phy2log.shape
    logcnt = np.stack([np.bincount(row, minlength=experts) for row in phy2log])
    log2phy = np.full((layers, experts, int(logcnt.max())), -1, dtype=np.int64)
    for layer in range(layers):
        filled = np.zeros(experts, dtype=np.int64)
        for slot, expert in enumerate(phy2log[layer]):
            log2phy[layer, expert, filled[expert]] = slot
            filled[expert] += 1
    return phy2log, log2phy, logcnt


def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    weight = np.asarray(weight, dtype=np.float64)
    return balance(weight, num_replicas, num_groups, num_nodes, num_gpus)
'''
ROUND_ROBIN = "    phy2log = np.tile(np.arange(num_replicas) % experts, (layers, 1))\n"
GREEDY = """    count = np.ones((layers, experts))
    spare = []
    for _ in range(num_replicas - experts):
        hottest = np.argmax(weight / count, axis=1)
        count[np.arange(layers), hottest] += 1
        spare.append(hottest)
    first = np.tile(np.arange(experts), (layers, 1))
    phy2log = np.concatenate([first, np.stack(spare, axis=1)], axis=1)
"""
# A harmless edit inside the evolve block: the LLM's answer when no scripted rule matches (an
# answer that changes nothing is not a candidate, and a run without candidates fails).
# OpenEvolve matches SEARCH blocks line by line, so an edited program gets the edit undone.
KEEP = diff_reply("    layers, experts = weight.shape", "    layers, experts = weight.shape  # kept")
UNDO_KEEP = ("shape  # kept", diff_reply("    layers, experts = weight.shape  # kept",
                                         "    layers, experts = weight.shape"))
RUN_CONFIG = {
    "checkpoint_interval": 1,
    "random_seed": 7,
    "enforce_evolve_blocks": True,
    "llm": {"retries": 0, "timeout": 30, "retry_delay": 0},
    "database": {"population_size": 20, "archive_size": 10, "num_islands": 1},
    "evaluator": {"timeout": 300, "cascade_evaluation": False, "parallel_evaluations": 1,
                  "max_retries": 0},
}


def start_run(tmp_path, llm, *, out: str, iterations: int, resume=None, full_rewrite=False,
              settings=SMALL):
    config = tmp_path / "openevolve.yaml"
    config.write_text(yaml.safe_dump(RUN_CONFIG))
    initial = tmp_path / "weak.py"
    initial.write_text(WEAK_PROGRAM)
    return run.evolve(
        settings, out_dir=tmp_path / out, iterations=iterations, config_path=config,
        llm=configs.LLMChoice(api_base=llm.base_url, models=("scripted",)),
        full_rewrite=full_rewrite, resume=resume, initial_program=initial, environ={},
    )


def checkpoint_programs(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in (folder / "programs").glob("*.json")]


def test_openevolve_improves_the_program_writes_its_layout_and_resumes(tmp_path):
    improve = diff_reply(ROUND_ROBIN, GREEDY, "Give spare slots to the hottest experts.")
    with ScriptedLLM([("np.tile(np.arange(num_replicas)", improve), UNDO_KEEP], KEEP) as llm:
        start = time.monotonic()
        result = start_run(tmp_path, llm, out="run", iterations=2)
        assert time.monotonic() - start < 60
        out = tmp_path / "run"
        for name in ("best/best_program.py", "best/best_program_info.json",
                     "best/tape_scores.json", "checkpoints/checkpoint_2/metadata.json",
                     "initial_program.py", "config.yaml", "windows.npz", "tape_evolve.json"):
            assert (out / name).is_file(), name
        assert list((out / "logs").glob("*.log"))
        assert len(llm.requests) == 2
        assert "balancedness_score" in llm.requests[0]["messages"][0]["content"]  # v2's prompt
        # The improvement was found and is the best program.
        initial_score = evaluator.score_candidate(tmp_path / "weak.py", SMALL)
        assert GREEDY.strip().splitlines()[0].strip() in result.best_program.read_text()
        assert result.best.metrics["combined_score"] > initial_score.metrics["combined_score"]
        info = json.loads((out / "best" / "best_program_info.json").read_text())
        assert info["metrics"]["combined_score"] == pytest.approx(
            result.best.metrics["combined_score"])
        scores = json.loads((out / "best" / "tape_scores.json").read_text())
        assert scores["program"]["combined_score"] == result.best.metrics["combined_score"]
        assert scores["deepseek"]["combined_score"] == result.deepseek.metrics["combined_score"]
        manifest = json.loads((out / "tape_evolve.json").read_text())
        assert manifest["settings"]["version"] == 2 and manifest["llm"]["models"] == ["scripted"]
        with np.load(out / "windows.npz") as saved:
            np.testing.assert_array_equal(saved["windows"], SMALL.windows())
            assert saved["steps"].tolist() == [100] * 6

        # Resume from the last checkpoint for one more iteration.
        resumed = start_run(tmp_path, llm, out="run", iterations=1,
                            resume=out / "checkpoints" / "checkpoint_2")
        assert len(llm.requests) == 3
        metadata = json.loads((out / "checkpoints" / "checkpoint_3" / "metadata.json").read_text())
        assert metadata["last_iteration"] == 3
        assert len(checkpoint_programs(out / "checkpoints" / "checkpoint_3")) >= 3
        assert resumed.best.metrics["combined_score"] >= result.best.metrics["combined_score"]

        # Resuming with other evaluation settings would make scores incomparable.
        with pytest.raises(ConfigError, match="version: run 2, now 0"):
            start_run(tmp_path, llm, out="run", iterations=1, settings=Settings(
                version=0, **SMALL_SYNTHETIC), resume=out / "checkpoints" / "checkpoint_3")
        with pytest.raises(ConfigError, match="already holds files"):
            start_run(tmp_path, llm, out="run", iterations=1)


def test_a_stray_tape_variable_stops_the_run_before_openevolve_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPE_VERISON", "3")
    config = tmp_path / "openevolve.yaml"
    config.write_text(yaml.safe_dump(RUN_CONFIG))
    with pytest.raises(ConfigError, match="unknown evaluation variable.*TAPE_VERISON"):
        run.evolve(SMALL, out_dir=tmp_path / "out", iterations=1, config_path=config,
                   llm=configs.LLMChoice(api_base="http://127.0.0.1:9/v1", models=("m",)),
                   environ={})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "given", "reason"),
    [
        ("max_iteration: 3\n", {}, r"unknown key\(s\) max_iteration"),
        ("llm: [1, 2\nmax_iterations: 3\n", {}, "not valid YAML"),
        ("max_iterations: 3\n", {"initial_program": "missing.py"}, "missing.py cannot be read"),
        ("max_iterations: 3\n", {"trace": "missing.json"}, "missing.json"),
        ("max_iterations: 3\n", {"config": "openevolve.yaml"}, "unknown section"),
    ],
)
def test_a_bad_input_stops_the_run_before_its_folder_is_made(tmp_path, text, given, reason):
    config = tmp_path / "openevolve.yaml"
    config.write_text(text)
    given = {name: tmp_path / value for name, value in given.items()}
    initial = given.pop("initial_program", None)
    settings = Settings(version=2, **SMALL_SYNTHETIC, **given)
    with pytest.raises(TapeError, match=reason):
        run.evolve(settings, out_dir=tmp_path / "out", iterations=1, config_path=config,
                   llm=configs.LLMChoice(api_base="http://127.0.0.1:9/v1", models=("m",)),
                   initial_program=initial, environ={})
    assert not (tmp_path / "out").exists()


def test_a_failure_while_writing_the_run_folder_removes_it(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run, "write_json_atomic", full_disk)
    config = tmp_path / "openevolve.yaml"
    config.write_text("max_iterations: 3\n")
    with ScriptedLLM([], KEEP) as llm, pytest.raises(
            ConfigError, match=f"^cannot write the run folder {tmp_path / 'out'}: No space left "
            "on device$"):
        run.evolve(SMALL, out_dir=tmp_path / "out", iterations=1, config_path=config,
                   llm=configs.LLMChoice(api_base=llm.base_url, models=("m",)), environ={})
    assert not (tmp_path / "out").exists()


def test_setup_files_that_cannot_be_moved_into_the_run_folder_are_a_one_line_error(
        tmp_path, monkeypatch):
    from tape.errors import EvolutionError

    out = tmp_path / "out"
    write_manifest = run.write_json_atomic

    def made_meanwhile(*args, **kwargs):  # another run makes the folder while these are written
        out.mkdir()
        return write_manifest(*args, **kwargs)

    monkeypatch.setattr(run, "write_json_atomic", made_meanwhile)
    config = tmp_path / "openevolve.yaml"
    config.write_text("max_iterations: 3\n")
    with ScriptedLLM([], KEEP) as llm, pytest.raises(
            EvolutionError, match=r"could not move the results into .*out \(another run made it "
            r"meanwhile\); they are in "):
        run.evolve(SMALL, out_dir=out, iterations=1, config_path=config,
                   llm=configs.LLMChoice(api_base=llm.base_url, models=("m",)), environ={})
    assert list(out.iterdir()) == [] and llm.requests == []


def test_an_out_that_cannot_be_written_stops_tape_evolve_before_the_endpoint_check(
        tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import tape.cli.common

    def read_only(out):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tape.cli.common, "probe_writable", read_only)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = f"http://127.0.0.1:{closed_port()}/v1"  # checked later, it would fail too
    result = CliRunner().invoke(make_app(), [
        "evolve", "--scoring", "2", *small_trace_options(tmp_path), "--api-base", base,
        "--llm", "m", "--evolve-config", "local", "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: cannot write to --out {tmp_path / 'out'}: Permission denied"]


def test_full_rewrites_and_a_hanging_candidate_inside_a_run(tmp_path):
    improved = WEAK_PROGRAM.replace(ROUND_ROBIN, GREEDY)
    hanging = WEAK_PROGRAM.replace(
        "    layers, experts = weight.shape\n",
        "    import time\n    while True:\n        time.sleep(1)\n",
    )
    replies = iter([f"```python\n{hanging}\n```", f"```python\n{improved}\n```"])
    with ScriptedLLM([], "") as llm:
        llm.reply_to = lambda body: (llm.requests.append(body), next(replies))[1]
        settings = Settings(version=2, timeout_s=1.0, **SMALL_SYNTHETIC)
        start = time.monotonic()
        result = start_run(tmp_path, llm, out="rewrite", iterations=2, full_rewrite=True,
                           settings=settings)
        assert time.monotonic() - start < 60
    programs = checkpoint_programs(tmp_path / "rewrite" / "checkpoints" / "checkpoint_2")
    stuck = [program for program in programs if "time.sleep(1)" in program["code"]]
    assert len(stuck) == 1 and stuck[0]["metrics"]["combined_score"] == 0.0
    artifacts = json.loads(stuck[0]["artifacts_json"])
    assert "timed out after 1 s; its process was killed" in artifacts["failure_reason"]
    assert "hottest = np.argmax" in result.best_program.read_text()


# -- the LLM endpoint's preflight ------------------------------------------------------------------


def closed_port() -> int:
    """A local TCP port that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_endpoint_that_answers_passes_the_preflight_whatever_its_status():
    from tape.evolution.endpoint import check_endpoint

    with ScriptedLLM([], KEEP) as llm:
        assert check_endpoint(llm.base_url, "k", key_variable="MY_KEY") is None
        llm.models_status = 404  # a server without /models: not worth a word
        assert check_endpoint(llm.base_url, "k", key_variable="MY_KEY") is None
        llm.models_status = 401
        warning = check_endpoint(llm.base_url + "/", "k", key_variable="MY_KEY")
        assert f"{llm.base_url}/ refused the API key (HTTP 401 for GET {llm.base_url}/models)" \
            in warning and "check MY_KEY" in warning
        llm.models_status = 500
        assert "answered HTTP 500" in check_endpoint(llm.base_url, None, key_variable="K")


@pytest.mark.parametrize(
    ("api_base", "reason"),
    [
        ("http://127.0.0.1:{port}/v1", ("cannot reach the LLM endpoint http://127.0.0.1:{port}/v1: "
                                        "Connection refused (GET http://127.0.0.1:{port}/v1/models); "
                                        "check --api-base (or llm.api_base in the config) and that "
                                        "the server is running")),
        ("http://no-such-host.invalid/v1", ("cannot reach the LLM endpoint http://no-such-host."
                                            "invalid/v1: unknown host 'no-such-host.invalid' "
                                            "(Name or service not known)")),
        ("localhost:8000/v1", "'localhost:8000/v1' is not an http(s) URL"),
        ("http://[::1/v1", "LLM endpoint 'http://[::1/v1' is not a valid URL (Invalid IPv6 URL)"),
        ("http://host:99999/v1", "'http://host:99999/v1' is not a valid URL (Port out of range"),
    ],
)
def test_an_endpoint_that_cannot_be_connected_to_is_an_error(api_base, reason, monkeypatch):
    import socket

    from tape.evolution.endpoint import check_endpoint

    resolve = socket.getaddrinfo

    def no_such_host(host, *args, **kwargs):  # offline and fast, whatever the resolver
        if host == "no-such-host.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    port = closed_port()
    with pytest.raises(ConfigError) as caught:
        check_endpoint(api_base.format(port=port), None, key_variable="K")
    assert reason.format(port=port) in str(caught.value)


def test_an_endpoint_that_accepts_the_connection_but_answers_late_is_only_a_warning():
    import socket

    from tape.evolution.endpoint import check_endpoint

    with socket.socket() as silent:  # accepts connections (the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        base = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        start = time.monotonic()
        warning = check_endpoint(base, None, key_variable="K", timeout_s=0.2)
        assert time.monotonic() - start < 2
    assert warning.startswith(f"no answer from the LLM endpoint {base} within 0.2 s (GET "
                              f"{base}/models); starting anyway")


def test_a_404_on_an_api_base_without_v1_suggests_it():
    from tape.evolution.endpoint import check_endpoint

    with ScriptedLLM([], KEEP) as llm:
        root = llm.base_url.removesuffix("/v1")
        assert check_endpoint(root, "k", key_variable="K") == (
            f"the LLM endpoint {root} answered HTTP 404 to GET {root}/models, but "
            f"{root}/v1/models answered: did you mean --api-base {root}/v1? Starting anyway")
        llm.models_status = 404  # no /models under /v1 either: nothing to suggest
        assert check_endpoint(root, "k", key_variable="K") is None


@pytest.fixture
def self_signed(tmp_path):
    """A self-signed certificate for 127.0.0.1 and its key (PEM files)."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certificate, key = tmp_path / "certificate.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(certificate), "-days", "1", "-subj",
         "/CN=127.0.0.1"], check=True, capture_output=True)
    return certificate, key


def test_a_certificate_that_cannot_be_verified_is_named_as_such(self_signed):
    from tape.evolution.endpoint import check_endpoint

    with ScriptedLLM([], KEEP, certificate=self_signed) as llm, pytest.raises(
            ConfigError) as caught:
        check_endpoint(llm.base_url, "k", key_variable="K")
    message = str(caught.value)
    assert f"cannot reach the LLM endpoint {llm.base_url}: its TLS certificate cannot be " \
        "verified (self-signed certificate)" in message
    assert "certificate problem" in message and "server is running" not in message
    with ScriptedLLM([], KEEP) as plain, pytest.raises(ConfigError, match="TLS handshake failed"):
        check_endpoint(plain.base_url.replace("http:", "https:"), "k", key_variable="K")


def test_a_redirect_to_another_origin_does_not_carry_the_key():
    from tape.evolution.endpoint import check_endpoint

    with ScriptedLLM([], KEEP) as elsewhere, ScriptedLLM(
            [], KEEP, models_redirect=f"{elsewhere.base_url}/models") as llm:
        assert check_endpoint(llm.base_url, "sk-secret", key_variable="K") is None
        first = {name.lower(): value for name, value in llm.get_headers[0].items()}
        assert first["authorization"] == "Bearer sk-secret"
        assert len(elsewhere.get_headers) == 1  # the redirect was followed ...
        assert "authorization" not in {name.lower() for name in elsewhere.get_headers[0]}


def test_tape_evolve_with_a_closed_port_stops_before_the_run_folder(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = f"http://127.0.0.1:{closed_port()}/v1"
    result = CliRunner().invoke(make_app(), [
        "evolve", "--scoring", "2", *small_trace_options(tmp_path), "--api-base", base,
        "--llm", "m", "--evolve-config", "local", "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 2, result.output
    message = (
        f"error: cannot reach the LLM endpoint {base}: Connection refused (GET {base}/models); "
        "check --api-base (or llm.api_base in the config) and that the server is running"
    )
    assert result.output.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_a_key_with_a_trailing_carriage_return_is_stripped_and_never_shown(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-1234\r")  # from a CRLF .env file
    base = f"http://127.0.0.1:{closed_port()}/v1"
    result = CliRunner().invoke(make_app(), [
        "evolve", "--scoring", "2", *small_trace_options(tmp_path), "--api-base", base,
        "--llm", "m", "--evolve-config", "local", "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 2, result.output
    assert "Connection refused" in result.output  # the real problem, not the header
    assert "secret" not in result.output and "Traceback" not in result.output
    assert configs.resolve_api_key({}, None, {"OPENAI_API_KEY": " k1\r\n"}) == (
        "k1", "OPENAI_API_KEY")
    with pytest.raises(ConfigError) as caught:
        configs.resolve_api_key({}, "MY_KEY", {"MY_KEY": "sk-sec\nret"})
    assert str(caught.value) == (
        "the API key in MY_KEY holds a control character at position 7, which an HTTP header "
        "cannot carry; set MY_KEY to the key alone")


def test_a_models_own_key_is_stripped_and_named_when_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("OTHER_KEY", "sk-other\r\n")  # OpenEvolve reads ${VAR} from os.environ
    with ScriptedLLM([], KEEP, models_status=401) as llm:
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({"llm": {"api_base": llm.base_url, "models": [
            {"name": "own", "api_key": "${OTHER_KEY}"}, {"name": "shared"}]}}))
        resolved = configs.resolve_config(
            config, version=2, iterations=1, llm=configs.LLMChoice(), full_rewrite=False,
            environ={"OPENAI_API_KEY": "sk-main"},
        )
        assert [model.api_key for model in resolved.config.llm.models] == ["sk-other", "sk-main"]
        warnings: list[str] = []
        run._check_endpoints(resolved, warnings.append)
    assert len(warnings) == 2
    assert "check OTHER_KEY (or --api-key-env)" in warnings[0]
    assert "check OPENAI_API_KEY (or --api-key-env)" in warnings[1]


@pytest.mark.parametrize("setting", [{"manual_mode": True}, {"provider": "claude_code"}])
def test_models_not_reached_over_http_need_no_key_and_no_preflight(tmp_path, setting):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"llm": {"api_base": "https://api.example.com/v1",
                                              "models": [{"name": "m"}], **setting}}))
    resolved = configs.resolve_config(
        config, version=2, iterations=1, llm=configs.LLMChoice(), full_rewrite=False, environ={},
    )
    assert resolved.endpoints == []


def test_no_endpoint_check_skips_the_preflight(tmp_path, monkeypatch):
    class Reached(Exception):
        """The run got past the endpoint check to writing its folder."""

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(run, "_write_setup", stop)
    config = tmp_path / "openevolve.yaml"
    config.write_text("max_iterations: 3\n")
    closed = configs.LLMChoice(api_base=f"http://127.0.0.1:{closed_port()}/v1", models=("m",))
    with pytest.raises(ConfigError, match="Connection refused"):
        run.evolve(SMALL, out_dir=tmp_path / "out", iterations=1, config_path=config,
                   llm=closed, environ={})
    with pytest.raises(Reached):
        run.evolve(SMALL, out_dir=tmp_path / "out", iterations=1, config_path=config,
                   llm=closed, environ={}, check_endpoints=False)
    from typer.testing import CliRunner

    given = {}
    monkeypatch.setattr(run, "evolve", lambda *args, **kwargs: given.update(kwargs) or stop())
    CliRunner().invoke(make_app(), [
        "evolve", "--scoring", "2", *small_trace_options(tmp_path), "--no-endpoint-check",
        "--evolve-config", "local", "--out", str(tmp_path / "out")])
    assert given["check_endpoints"] is False


# -- the command line ------------------------------------------------------------------------------


def make_app():
    import typer

    from tape.cli.evolve import register

    app = typer.Typer()
    register(app)
    return app


def test_tape_evolve_without_a_key_explains_how_to_set_one(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = CliRunner().invoke(make_app(), ["evolve", "--scoring", "2", "--out",
                                             str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "no API key: set OPENAI_API_KEY" in result.output
    assert not (tmp_path / "out" / "checkpoints").exists()


def small_trace_options(tmp_path) -> list[str]:
    """--trace (a small synthetic trace of 4 windows, written to tmp_path) and its layout."""
    from tape.synthetic import synthetic_trace

    trace = tmp_path / "trace.npy"
    np.save(trace, synthetic_trace(num_steps=400, num_layers=4, num_experts=32, num_groups=4))
    return ["--trace", str(trace), "--replicas", "48", "--groups", "4", "--nodes", "2",
            "--gpus", "8"]


def evolve_from_the_command_line(tmp_path, monkeypatch, version: str, reply: str,
                                 *options: str, models_status: int = 200, **config_changes):
    """`tape evolve` for one iteration on a small trace into tmp_path / "cli-run", the scripted
    LLM answering `reply` (and `models_status` to the preflight's GET /models), RUN_CONFIG with
    `config_changes`, more command-line `options`."""
    from typer.testing import CliRunner

    config = tmp_path / "openevolve.yaml"
    config.write_text(yaml.safe_dump({**RUN_CONFIG, **config_changes}))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with ScriptedLLM([], reply, models_status=models_status) as llm:
        return CliRunner().invoke(make_app(), [
            "evolve", "--scoring", version, "--iterations", "1", *small_trace_options(tmp_path),
            "--api-base", llm.base_url, "--llm", "scripted", "--evolve-config", str(config),
            "--out", str(tmp_path / "cli-run"), *options,
        ])


def test_an_initial_program_that_fails_stops_tape_evolve_before_the_run_folder(tmp_path,
                                                                               monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    raises = write(tmp_path, "raise.py", RAISES)
    with ScriptedLLM([], KEEP) as llm:
        result = CliRunner().invoke(make_app(), [
            "evolve", "--scoring", "2", "--iterations", "1", *small_trace_options(tmp_path),
            "--initial", str(raises),
            "--api-base", llm.base_url, "--llm", "scripted", "--evolve-config", "local",
            "--out", str(tmp_path / "out"),
        ])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: initial program {raises} fails, so evolution would start from a score of 0: "
        "rebalance_experts raised ZeroDivisionError: division by zero"), result.output
    assert not (tmp_path / "out").exists() and llm.requests == []


def test_an_initial_program_that_is_a_folder_is_named_as_such(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(make_app(), [
        "evolve", "--initial", str(tmp_path), "--api-base", "http://127.0.0.1:9/v1",
        "--llm", "m", *small_trace_options(tmp_path), "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: initial program {tmp_path} is a folder, not a Python file"
    assert not (tmp_path / "out").exists()


def test_evolve_names_the_moe_model_and_presets_as_every_command_does():
    # --model is the MoE model and --config the presets file, as in tape evaluate; the LLM side
    # has --llm and --evolve-config.
    from typer.testing import CliRunner

    result = CliRunner().invoke(make_app(), ["evolve", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())
    assert "the --config file's cluster: preset:, else h800" in text
    assert "the --config file's model: preset:, else deepseek-v3" in text
    assert "--llm" in text and "--evolve-config" in text and "--moe-model" not in text
    assert "with --resume, the checkpoint's run folder" in text


def test_tape_evolve_runs_from_the_command_line(tmp_path, monkeypatch):
    # A server that refuses GET /models with 401 may still serve chat: a warning, not an error.
    result = evolve_from_the_command_line(tmp_path, monkeypatch, "realistic", KEEP,
                                          models_status=401)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("warning: the LLM endpoint http://127.0.0.1:")
    assert "refused the API key (HTTP 401" in result.output
    assert "best evolved program vs deepseek" in result.output
    assert (tmp_path / "cli-run" / "best" / "tape_scores.json").is_file()


class InterruptingLLM(ScriptedLLM):
    """Sends this process SIGINT (a Ctrl-C) when the first chat request arrives."""

    def reply_to(self, body):
        if not self.requests:
            os.kill(os.getpid(), signal.SIGINT)
        return super().reply_to(body)


def test_ctrl_c_stops_tape_evolve_keeps_the_best_so_far_and_says_so(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    config = tmp_path / "openevolve.yaml"
    config.write_text(yaml.safe_dump(RUN_CONFIG))
    out = tmp_path / "cli-run"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with InterruptingLLM([], KEEP) as llm:
        result = CliRunner().invoke(make_app(), [
            "evolve", "--scoring", "2", "--iterations", "50", *small_trace_options(tmp_path),
            "--api-base", llm.base_url, "--llm", "scripted", "--evolve-config", str(config),
            "--out", str(out),
        ])
    assert result.exit_code == 130, result.output
    assert len(llm.requests) < 50
    assert "best evolved program vs deepseek" in result.output
    assert result.output.rstrip().endswith(
        "interrupted: the run stopped before its last iteration; the best program is the best "
        "of the iterations that finished")
    assert (out / "best" / "tape_scores.json").is_file()
    assert signal.getsignal(signal.SIGINT) is not None  # OpenEvolve's handlers were removed
    assert getattr(signal.getsignal(signal.SIGINT), "__name__", "") != "force_exit_handler"


def test_a_run_where_the_llm_never_gives_a_usable_answer_is_a_clear_error(tmp_path, monkeypatch):
    result = evolve_from_the_command_line(tmp_path, monkeypatch, "2", "No change.")
    assert result.exit_code == 2, result.output
    assert "the LLM gave no usable candidate program" in result.output
    assert "Traceback" not in result.output
    # What ran is kept, and the message names the checkpoint that --resume takes.
    checkpoint = tmp_path / "cli-run" / "checkpoints" / "checkpoint_1"
    assert (checkpoint / "metadata.json").is_file()
    assert f"--resume {checkpoint} continues it" in result.output
    again = evolve_from_the_command_line(tmp_path, monkeypatch, "2", KEEP)
    assert again.exit_code == 2
    assert f"continue its run with --resume {checkpoint}, replace the run with --overwrite" \
        in again.output


def test_a_failed_run_without_a_checkpoint_says_so_and_is_replaced_with_overwrite(
        tmp_path, monkeypatch):
    result = evolve_from_the_command_line(tmp_path, monkeypatch, "2", "No change.",
                                          checkpoint_interval=100)
    out = tmp_path / "cli-run"
    assert result.exit_code == 2, result.output
    assert not (out / "checkpoints").exists()
    assert f"the run's logs are in {out / 'logs'}; it wrote no checkpoint: run again with " \
        "--overwrite or another --out" in result.output
    again = evolve_from_the_command_line(tmp_path, monkeypatch, "2", KEEP)
    assert again.exit_code == 2
    assert "--resume" not in again.output
    assert "its run wrote no checkpoint, so there is nothing to resume; replace the run with " \
        "--overwrite" in again.output
    (out / "notes.txt").write_text("mine")  # not the run's: --overwrite keeps it
    replaced = evolve_from_the_command_line(tmp_path, monkeypatch, "2", KEEP, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert f"to continue:  --resume {out / 'checkpoints' / 'checkpoint_1'}" in replaced.output
    assert (out / "notes.txt").read_text() == "mine"
    assert [entry.name for entry in out.iterdir() if entry.name.startswith(".")] == []


def test_overwrite_keeps_the_earlier_run_when_writing_the_new_one_fails(tmp_path, monkeypatch):
    out = tmp_path / "run"
    earlier = {"tape_evolve.json": "{}", "initial_program.py": "old", "notes.txt": "mine",
               "checkpoints/checkpoint_1/metadata.json": "{}", "logs/run.log": "old log",
               "best/best_program.py": "old best"}
    for name, text in earlier.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run, "write_json_atomic", full_disk)
    config = tmp_path / "openevolve.yaml"
    config.write_text("max_iterations: 3\n")
    with ScriptedLLM([], KEEP) as llm, pytest.raises(ConfigError, match="No space left"):
        run.evolve(SMALL, out_dir=out, iterations=1, config_path=config, overwrite=True,
                   llm=configs.LLMChoice(api_base=llm.base_url, models=("m",)), environ={})
    kept = {str(path.relative_to(out)): path.read_text()
            for path in out.rglob("*") if path.is_file()}
    assert kept == earlier  # every file as it was, nothing set aside or staged left behind


def used_folder_error(tmp_path, out: Path, **options) -> str:
    """The error of run.evolve into `out` (it stops at the folder check, before anything)."""
    with pytest.raises(ConfigError) as caught:
        run.evolve(SMALL, out_dir=out, iterations=1, config_path=tmp_path / "unused.yaml",
                   llm=configs.LLMChoice(api_base="http://127.0.0.1:9/v1", models=("m",)),
                   environ={}, **options)
    return str(caught.value)


def test_a_used_folder_names_the_newest_real_checkpoint_or_none(tmp_path):
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / run.MANIFEST).write_text("{}")
    assert used_folder_error(tmp_path, out).endswith(
        "its run wrote no checkpoint, so there is nothing to resume; replace the run with "
        "--overwrite, remove the folder, or choose another --out")
    for iteration, complete in ((1, True), (10, True), (20, False)):  # 20: metadata missing
        folder = out / "checkpoints" / f"checkpoint_{iteration}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "metadata.json").write_text("{}")
    newest = out / "checkpoints" / "checkpoint_10"
    assert run.newest_checkpoint(out) == newest
    assert f"continue its run with --resume {newest}," in used_folder_error(tmp_path, out)
    missing = out / "checkpoints" / "checkpoint_20"
    assert used_folder_error(tmp_path, out, resume=missing) == (
        f"{missing} is not an OpenEvolve checkpoint (no metadata.json); the newest checkpoint "
        f"of that run is {newest}")
    assert "give one" in used_folder_error(tmp_path, out, resume=newest, overwrite=True)


def test_resuming_from_a_damaged_checkpoint_or_manifest_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "checkpoint_2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "metadata.json").write_text("{trunc")
    (out / run.MANIFEST).write_text(json.dumps({"settings": SMALL.to_json()}))
    assert used_folder_error(tmp_path, out, resume=checkpoint).startswith(
        f"cannot resume: the checkpoint metadata {checkpoint / 'metadata.json'} is unreadable (")
    (checkpoint / "metadata.json").write_text("{}")
    (out / run.MANIFEST).write_text("[]")
    assert used_folder_error(tmp_path, out, resume=checkpoint) == (
        f"cannot resume: the run manifest {out / run.MANIFEST} is not a JSON object")


def test_overwrite_replaces_only_a_tape_evolve_run(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    assert used_folder_error(tmp_path, other) == (
        f"output folder {other} already holds files; choose another --out")
    assert used_folder_error(tmp_path, other, overwrite=True) == (
        f"--overwrite replaces an earlier tape evolve run, but {other} holds none (no "
        f"{run.MANIFEST}); choose another --out")


def _sigint_ignored_after_importing_the_evaluator() -> bool:
    import signal

    import tape.evolution.evaluator  # noqa: F401  (as OpenEvolve's worker loads it)

    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_worker_leaves_ctrl_c_to_tape_evolve():
    # Ctrl-C reaches every process of the terminal's group: OpenEvolve's workers ignore it (no
    # KeyboardInterrupt traceback from a worker busy in Python), the process that runs the
    # evolution keeps it.
    import multiprocessing
    import signal

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_sigint_ignored_after_importing_the_evaluator) is True
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
