"""`tape evolve`: an OpenEvolve run that evolves `rebalance_experts` under one scoring version.

`evolve(settings, out_dir=..., ...)` does what the seed did by hand:

1. reads an OpenEvolve config (a shipped one from `tape/evolve_configs/`, or the user's), checks
   its keys strictly, and applies the command line: endpoint, models, iterations, full rewrites;
   the system message states the chosen version's objective unless the config sets its own;
2. takes the API key from the environment (`OPENAI_API_KEY`, or the variable named by
   `--api-key-env` or by an `api_key: ${VAR}` in the config), never from a file; a local
   endpoint (localhost) needs none;
3. writes the run folder: `initial_program.py`, `config.yaml` (the resolved config, key left
   out), `windows.npy` (the windows every candidate is scored on, computed once) and
   `tape_evolve.json` (the manifest);
4. runs OpenEvolve with `tape/evolution/evaluator.py` (sandboxed candidates), which writes
   `best/`, `checkpoints/` and `logs/`;
5. scores the best program with every TAPE metric, beside the `deepseek` policy, in
   `best/tape_scores.json`.

Resuming (`resume=checkpoint folder`) continues a run in its own folder with the same evaluation
settings (a mismatch is an error, so scores stay comparable).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import yaml

from tape.errors import ConfigError
from tape.evolution import prompts
from tape.evolution.settings import ENVIRONMENT, EvaluationSettings, require_new_folder
from tape.files import write_json_atomic
from tape.protocol import ProgramScore, score_policy
from tape.sandbox import STARTUP_SECONDS

__all__ = [
    "DEFAULT_API_KEY_VARIABLE",
    "DEFAULT_CONFIG",
    "EvolveResult",
    "LLMChoice",
    "ResolvedConfig",
    "evolve",
    "find_config",
    "resolve_api_key",
    "resolve_config",
    "shipped_config",
    "shipped_config_names",
]

DEFAULT_CONFIG = "gemini"
"""The shipped config `tape evolve` uses without --config (the seed's Gemini models)."""
DEFAULT_API_KEY_VARIABLE = "OPENAI_API_KEY"
"""Where the API key is read from unless --api-key-env or the config names another variable."""
LOCAL_KEY_PLACEHOLDER = "no-key-needed-for-a-local-server"
"""The key sent to a local endpoint when none is set (the OpenAI client insists on one)."""

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
_VARIABLE_REFERENCE = re.compile(r"^\$\{([^}]+)\}$")
MANIFEST = "tape_evolve.json"


@dataclass(frozen=True)
class LLMChoice:
    """Command-line choices about the LLM, each overriding the config when given.

    Attributes:
        api_base: an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.
        models: model names, sampled with equal weights.
        api_key_env: the environment variable that holds the API key.
    """

    api_base: str | None = None
    models: tuple[str, ...] = ()
    api_key_env: str | None = None


@dataclass
class EvolveResult:
    """What an evolution run produced.

    Attributes:
        out_dir: the run folder.
        best_program: `best/best_program.py` in it.
        best: the best program's TAPE scores (every metric).
        deepseek: the `deepseek` policy's scores on the same windows, for comparison.
    """

    out_dir: Path
    best_program: Path
    best: ProgramScore
    deepseek: ProgramScore


@dataclass
class ResolvedConfig:
    """An OpenEvolve config ready to run.

    Attributes:
        config: the `openevolve.config.Config`, API key included.
        saved: the same settings as a dict for the run folder, API key left out.
        key_variable: the environment variable the key was read from.
    """

    config: Any
    saved: dict[str, Any]
    key_variable: str


# -- configs ---------------------------------------------------------------------------------


def shipped_config_names() -> list[str]:
    """Names of the configs in `tape/evolve_configs/` (without `.yaml`)."""
    folder = resources.files("tape").joinpath("evolve_configs")
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def find_config(name_or_path: str) -> Path:
    """A config given as a path (a .yaml/.yml name or one with a folder), else a shipped name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1 or path.is_file():
        if not path.is_file():
            raise ConfigError(f"OpenEvolve config {path} does not exist")
        return path
    return shipped_config(name_or_path)


def shipped_config(name: str) -> Path:
    """The path of a shipped config by name (`gemini`, `local`)."""
    names = shipped_config_names()
    if name not in names:
        raise ConfigError(f"no shipped config {name!r}; shipped: {', '.join(names)}")
    return Path(str(resources.files("tape").joinpath("evolve_configs", f"{name}.yaml")))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"OpenEvolve config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"OpenEvolve config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"OpenEvolve config {path} must hold a mapping")
    return data


def _check_keys(data: Mapping[str, Any], path: Path) -> None:
    """Unknown keys are errors (dacite would drop them silently), in every section."""
    from openevolve import config as schema

    def check(section: Mapping[str, Any], kind: type, where: str) -> None:
        known = {field.name for field in dataclasses.fields(kind)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(unknown)} in {where} of {path}; known: "
                f"{', '.join(sorted(known))}"
            )

    check(data, schema.Config, "the top level")
    sections = {
        "llm": schema.LLMConfig, "prompt": schema.PromptConfig, "database": schema.DatabaseConfig,
        "evaluator": schema.EvaluatorConfig, "evolution_trace": schema.EvolutionTraceConfig,
    }
    for name, kind in sections.items():
        if isinstance(data.get(name), dict):
            check(data[name], kind, f"section {name}")
    for index, model in enumerate(_model_entries(data.get("llm") or {})):
        check(model, schema.LLMModelConfig, f"llm model {index}")


def _model_entries(llm: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        model for key in ("models", "evaluator_models") for model in llm.get(key) or []
        if isinstance(model, dict)
    ]


def _is_local(api_base: str) -> bool:
    return (urlparse(api_base).hostname or "") in _LOCAL_HOSTS


def resolve_api_key(
    llm: Mapping[str, Any], api_key_env: str | None, environ: Mapping[str, str]
) -> tuple[str, str]:
    """The API key to use and the variable it came from.

    The variable is `api_key_env` if given, else one named as `llm: api_key: ${VAR}` in the
    config, else OPENAI_API_KEY (a model's own `api_key: ${VAR}` is left to OpenEvolve). With
    that variable unset, an endpoint on this machine gets a placeholder (local servers ignore
    it) unless the variable was named explicitly.

    Raises:
        ConfigError: a key written literally in the config, or no key for a remote endpoint.
    """
    for entry in (llm, *_model_entries(llm)):
        value = entry.get("api_key")
        if value is not None and not _VARIABLE_REFERENCE.match(str(value)):
            raise ConfigError(
                "the OpenEvolve config holds an API key; remove it and keep the key in an "
                "environment variable (OPENAI_API_KEY, or --api-key-env NAME, or api_key: ${NAME})"
            )
    reference = _VARIABLE_REFERENCE.match(str(llm.get("api_key") or ""))
    named = reference.group(1) if reference else None
    variable = api_key_env or named or DEFAULT_API_KEY_VARIABLE
    key = environ.get(variable)
    if key:
        return key, variable
    bases = [str(llm.get("api_base") or "https://api.openai.com/v1")]
    bases += [str(model["api_base"]) for model in _model_entries(llm) if model.get("api_base")]
    if not (api_key_env or named) and all(_is_local(base) for base in bases):
        return LOCAL_KEY_PLACEHOLDER, variable
    raise ConfigError(
        f"no API key: set {variable} to your LLM provider's key (export {variable}=...), name "
        f"another variable with --api-key-env, or use a local OpenAI-compatible server with "
        f"--api-base http://localhost:8000/v1 (vLLM) or http://localhost:11434/v1 (ollama); "
        f"without an LLM, `tape tune` improves the tape policy"
    )


def resolve_config(
    path: Path,
    *,
    version: int | str,
    iterations: int | None,
    llm: LLMChoice,
    full_rewrite: bool,
    environ: Mapping[str, str],
) -> ResolvedConfig:
    """The OpenEvolve `Config` to run, its dict as saved in the run folder (no API key).

    Applies the command line to the file's settings; the system message becomes the version's
    (`prompts.system_message`) unless the file sets `prompt.system_message`.
    """
    from dacite import DaciteError
    from openevolve.config import Config

    data = _read_yaml(path)
    _check_keys(data, path)
    data["llm"] = data.get("llm") or {}
    data["prompt"] = data.get("prompt") or {}
    llm_section = data["llm"]
    if llm.models:
        for key in ("primary_model", "primary_model_weight", "secondary_model",
                    "secondary_model_weight", "evaluator_models"):
            llm_section.pop(key, None)
        llm_section["models"] = [{"name": name, "weight": 1.0} for name in llm.models]
    if llm.api_base:
        llm_section["api_base"] = llm.api_base
        for model in _model_entries(llm_section):
            model.pop("api_base", None)
    if iterations is not None:
        data["max_iterations"] = iterations
    if full_rewrite:
        data["diff_based_evolution"] = False
    data["prompt"].setdefault("system_message", prompts.system_message(version))
    key, variable = resolve_api_key(llm_section, llm.api_key_env, environ)
    saved = {**data, "llm": {k: v for k, v in llm_section.items() if k != "api_key"}}
    running = {**data, "llm": {**llm_section, "api_key": key}}
    try:
        config = Config.from_dict(running)
    except (DaciteError, ValueError, TypeError) as error:
        raise ConfigError(f"OpenEvolve rejected the config {path}: {error}") from None
    if not config.llm.models:
        raise ConfigError(f"OpenEvolve config {path} names no LLM model; pass --model NAME")
    return ResolvedConfig(config, saved, variable)


def _evaluation_bound(settings: EvaluationSettings) -> float:
    """Seconds one evaluation can take at most: start-up, import and every call at its limit."""
    pairs = settings.windows().shape[0] - 1
    return STARTUP_SECONDS + (pairs + 1) * settings.timeout_s + 30.0


# -- the run folder --------------------------------------------------------------------------


def _prepare_folder(out_dir: Path, resume: Path | None) -> None:
    if resume is not None:
        if not (resume / "metadata.json").is_file():
            raise ConfigError(f"{resume} is not an OpenEvolve checkpoint (no metadata.json)")
        if resume.resolve().parent.parent != out_dir.resolve():
            raise ConfigError(
                f"a run resumes in its own folder: {resume} belongs to "
                f"{resume.resolve().parent.parent}, not {out_dir}"
            )
        return
    require_new_folder(
        out_dir, f"continue its run with --resume {out_dir}/checkpoints/checkpoint_N, or choose "
        "another --out"
    )
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_resumed_settings(out_dir: Path, settings: EvaluationSettings) -> None:
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise ConfigError(
            f"cannot resume in {out_dir}: it has no {MANIFEST} (not a tape evolve run)"
        )
    import json

    saved = json.loads(manifest.read_text())["settings"]
    current = settings.to_json()
    differences = [
        f"{name}: run {saved.get(name)!r}, now {current[name]!r}"
        for name in current if saved.get(name) != current[name]
    ]
    if differences:
        raise ConfigError(
            "resume with the run's evaluation settings (scores must stay comparable); "
            + "; ".join(differences)
        )


@contextmanager
def _evaluation_environment(settings: EvaluationSettings) -> Iterator[None]:
    """TAPE_* variables for OpenEvolve's workers during the run; the old ones restored after."""
    saved = {name: os.environ.get(name) for name in ENVIRONMENT.values()}
    for name in ENVIRONMENT.values():
        os.environ.pop(name, None)
    os.environ.update(settings.to_environment())
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _openevolve_side_effects_undone() -> Iterator[None]:
    """OpenEvolve adds root log handlers and SIGINT/SIGTERM handlers; remove them afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    signal_handlers = {number: signal.getsignal(number) for number in (signal.SIGINT,
                                                                       signal.SIGTERM)}
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
        for number, handler in signal_handlers.items():
            signal.signal(number, handler)


def evolve(
    settings: EvaluationSettings,
    *,
    out_dir: Path,
    iterations: int | None = None,
    config_path: Path | None = None,
    llm: LLMChoice = LLMChoice(),
    full_rewrite: bool = False,
    resume: Path | None = None,
    initial_program: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> EvolveResult:
    """Run OpenEvolve on `rebalance_experts` under `settings` (see the module doc).

    Args:
        settings: what candidates are scored on (version, trace, layout, limits).
        out_dir: the run folder (new or empty; when resuming, the checkpoint's run folder).
        iterations: evolution iterations (None: the config's `max_iterations`).
        config_path: an OpenEvolve YAML (None: the shipped `gemini`, or when resuming the run's
            own `config.yaml`).
        llm: endpoint, models and key variable from the command line.
        full_rewrite: ask the LLM for whole programs instead of SEARCH/REPLACE diffs.
        resume: a checkpoint folder (`<run>/checkpoints/checkpoint_N`) to continue from.
        initial_program: the program to start from (None: DeepSeek's policy in numpy).
        environ: where the API key is looked up (None: `os.environ`).

    Raises:
        ConfigError: a bad config, no API key, a used output folder, mismatched resume settings.
    """
    from openevolve import OpenEvolve

    from tape.evolution import evaluator

    environ = os.environ if environ is None else environ
    stray = {name: value for name, value in os.environ.items()
             if name.startswith("TAPE_") and name not in ENVIRONMENT.values()}
    EvaluationSettings.from_environment(stray)  # a stray TAPE_* variable would fail every worker
    out_dir = Path(out_dir)
    resume = Path(resume) if resume is not None else None
    _prepare_folder(out_dir, resume)
    if resume is not None:
        _check_resumed_settings(out_dir, settings)
    if config_path is None:
        resumed_config = out_dir / "config.yaml"
        config_path = resumed_config if resume and resumed_config.is_file() else shipped_config(
            DEFAULT_CONFIG
        )
    resolved = resolve_config(
        Path(config_path), version=settings.version, iterations=iterations, llm=llm,
        full_rewrite=full_rewrite, environ=environ,
    )
    config, saved_config = resolved.config, resolved.saved
    windows = settings.windows()
    bound = _evaluation_bound(settings)
    if config.evaluator.timeout < bound:
        logging.getLogger(__name__).warning(
            "raising evaluator.timeout from %s to %.0f s: OpenEvolve must not abandon an "
            "evaluation that the sandbox is still bounding", config.evaluator.timeout, bound,
        )
        config.evaluator.timeout = int(np.ceil(bound))
        saved_config.setdefault("evaluator", {})["timeout"] = config.evaluator.timeout

    program_path = out_dir / "initial_program.py"
    windows_path = out_dir / "windows.npy"
    if resume is None:
        source = (
            Path(initial_program).read_text() if initial_program else prompts.initial_program_text()
        )
        program_path.write_text(source)
        np.save(windows_path, windows)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(saved_config, sort_keys=False))
        write_json_atomic(out_dir / MANIFEST, _manifest(settings, config_path, resolved))
    worker_settings = dataclasses.replace(settings, trace=None, windows_file=windows_path)

    with _evaluation_environment(worker_settings), _openevolve_side_effects_undone():
        controller = OpenEvolve(
            initial_program_path=str(program_path), evaluation_file=evaluator.__file__,
            config=config, output_dir=str(out_dir),
        )
        asyncio.run(
            controller.run(iterations=iterations, checkpoint_path=str(resume) if resume else None)
        )

    best_program = out_dir / "best" / "best_program.py"
    if not best_program.is_file():
        raise ConfigError(f"OpenEvolve wrote no best program to {best_program}; see {out_dir}/logs")
    best = evaluator.score_candidate(best_program, worker_settings)
    model, cluster = settings.specs()
    deepseek = score_policy(
        "deepseek", windows, settings.layout(), version=settings.version, model=model,
        cluster=cluster, dispatch=settings.dispatch, steps_per_window=settings.interval,
    )
    write_json_atomic(
        out_dir / "best" / "tape_scores.json",
        {"version": settings.version, "program": best.to_json(),
         "deepseek": deepseek.to_json()},
    )
    return EvolveResult(out_dir, best_program, best, deepseek)


def _manifest(settings: EvaluationSettings, config_path: Path, resolved: ResolvedConfig
              ) -> dict[str, Any]:
    from importlib.metadata import version as package_version

    return {
        "command": "tape evolve",
        "tape_version": package_version("tape-moe"),
        "openevolve_version": package_version("openevolve"),
        "version": settings.version,
        "windows": settings.describe_source(),
        "settings": settings.to_json(),
        "config": str(config_path),
        "llm": {
            "api_base": resolved.config.llm.api_base,
            "models": [model.name for model in resolved.config.llm.models],
            "api_key_variable": resolved.key_variable,
        },
        "random_seed": resolved.config.random_seed,
    }
