"""OpenEvolve configs for `tape evolve`: shipped ones, strict loading, the command line, the key.

`resolve_config` reads an OpenEvolve YAML (a shipped one from `tape/evolve_configs/` or the
user's), rejects unknown keys (OpenEvolve's loader would drop them silently), applies the command
line (endpoint, models, iterations, full rewrites), writes the chosen version's objective into
the system message unless the file sets its own, and takes the API key from the environment:
`OPENAI_API_KEY`, or the variable named by `--api-key-env` or by `llm: api_key: ${VAR}`. A key
written in a file is refused; a local endpoint (localhost) needs none, nor does a model that
OpenEvolve does not reach over HTTP (`manual_mode`, a CLI `provider` such as claude_code). Keys
lose surrounding whitespace (a CRLF .env file leaves a `\r`); one holding a character that an
HTTP header cannot carry is an error whose message does not show the key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tape.errors import ConfigError
from tape.evolution import prompts
from tape.presets import read_mapping_file

__all__ = [
    "DEFAULT_API_KEY_VARIABLE",
    "DEFAULT_CONFIG",
    "LOCAL_KEY_PLACEHOLDER",
    "LLMChoice",
    "LLMEndpoint",
    "ResolvedConfig",
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


@dataclass(frozen=True)
class LLMEndpoint:
    """An endpoint the run's models send requests to over HTTP.

    Attributes:
        api_base: the OpenAI-compatible endpoint.
        api_key: the key sent to it.
        key_variable: the environment variable the key came from.
    """

    api_base: str
    api_key: str
    key_variable: str


@dataclass
class ResolvedConfig:
    """An OpenEvolve config ready to run.

    Attributes:
        config: the `openevolve.config.Config`, API keys included.
        saved: the same settings as a dict for the run folder, API key left out.
        key_variable: the environment variable the key was read from.
        endpoints: the endpoints of the models OpenEvolve reaches over HTTP (not those in
            manual mode or with a CLI provider), each once.
    """

    config: Any
    saved: dict[str, Any]
    key_variable: str
    endpoints: list[LLMEndpoint] = dataclasses.field(default_factory=list)


def shipped_config_names() -> list[str]:
    """Names of the configs in `tape/evolve_configs/` (without `.yaml`)."""
    folder = resources.files("tape").joinpath("evolve_configs")
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def find_config(name_or_path: str) -> Path:
    """A config given as a path (a .yaml/.yml name or one with a folder), else a shipped name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1 or path.is_file():
        _require_file(path)
        return path
    if path.is_dir() and name_or_path not in shipped_config_names():
        _require_file(path)
    return shipped_config(name_or_path)


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(
            f"OpenEvolve config {path} is a folder, not a YAML file; give a .yaml file or a "
            f"shipped config's name ({', '.join(shipped_config_names())})"
        )
    if not path.is_file():
        raise ConfigError(f"OpenEvolve config {path} does not exist")


def shipped_config(name: str) -> Path:
    """The path of a shipped config by name (`gemini`, `local`)."""
    names = shipped_config_names()
    if name not in names:
        raise ConfigError(f"no shipped config {name!r}; shipped: {', '.join(names)}")
    return Path(str(resources.files("tape").joinpath("evolve_configs", f"{name}.yaml")))


def _read_yaml(path: Path) -> dict[str, Any]:
    _require_file(path)  # its folder message names the shipped configs
    return read_mapping_file(path, "OpenEvolve config")


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
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise ConfigError(f"section {name} of {path} must be a mapping of settings "
                              f"(key: value), got {_kind(data[name])}")
        if isinstance(data.get(name), dict):
            check(data[name], kind, f"section {name}")
    for key in ("models", "evaluator_models"):
        models = (data.get("llm") or {}).get(key)
        if models is not None and not (isinstance(models, list) and all(
                isinstance(model, dict) for model in models)):
            raise ConfigError(f"llm: {key} of {path} must be a list of models (each a mapping "
                              f"with name: and weight:), got {_kind(models)}")
    for index, model in enumerate(_model_entries(data.get("llm") or {})):
        check(model, schema.LLMModelConfig, f"llm model {index}")


def _kind(value: Any) -> str:
    """How a message names the type of a YAML value: "an int (5)", "a list"."""
    name = {"int": "a number", "float": "a number", "str": "a string", "list": "a list",
            "bool": "a boolean", "dict": "a mapping"}.get(type(value).__name__, "a value")
    return f"{name} ({value!r})" if not isinstance(value, (list, dict)) else name


def _model_entries(llm: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        model for key in ("models", "evaluator_models") for model in llm.get(key) or []
        if isinstance(model, dict)
    ]


def _is_local(api_base: str) -> bool:
    try:
        return (urlparse(api_base).hostname or "") in _LOCAL_HOSTS
    except ValueError:  # a malformed URL: the endpoint check says so
        return False


def _over_http(manual_mode: Any, provider: Any) -> bool:
    """Whether OpenEvolve sends a model's requests over HTTP with its OpenAI client: not in
    manual mode (a human answers), not through a CLI provider (claude_code, copilot_cli, ...)."""
    return manual_mode is not True and provider in (None, "openai")


def _clean_key(key: str, variable: str) -> str:
    """`key` without surrounding whitespace; ConfigError, not showing the key, if it holds a
    character that an HTTP header cannot carry."""
    key = key.strip()
    for position, character in enumerate(key, start=1):
        if not " " <= character <= "~":
            kind = "a control character" if character.isascii() else "a non-ASCII character"
            raise ConfigError(
                f"the API key in {variable} holds {kind} at position {position}, which an HTTP "
                f"header cannot carry; set {variable} to the key alone"
            )
    return key


def resolve_api_key(
    llm: Mapping[str, Any], api_key_env: str | None, environ: Mapping[str, str]
) -> tuple[str, str]:
    """The API key to use (surrounding whitespace removed) and the variable it came from.

    The variable is `api_key_env` if given, else one named as `llm: api_key: ${VAR}` in the
    config, else OPENAI_API_KEY (a model's own `api_key: ${VAR}` is left to OpenEvolve). With
    that variable unset, endpoints on this machine get a placeholder (local servers ignore
    it) unless the variable was named explicitly; so do models not reached over HTTP.

    Raises:
        ConfigError: a key written literally in the config, no key for a remote endpoint, or a
            key holding a character an HTTP header cannot carry.
    """
    for entry in (llm, *_model_entries(llm)):
        value = entry.get("api_key")
        if value is not None and not _VARIABLE_REFERENCE.match(str(value)):
            raise ConfigError(
                "the OpenEvolve config holds an API key; remove it and keep the key in an "
                "environment variable (OPENAI_API_KEY, or --api-key-env NAME, or api_key: ${NAME})"
            )
    named = _referenced_variable(llm.get("api_key"))
    variable = api_key_env or named or DEFAULT_API_KEY_VARIABLE
    key = _clean_key(environ.get(variable) or "", variable)
    if key:
        return key, variable
    default_base = str(llm.get("api_base") or "https://api.openai.com/v1")
    models = _model_entries(llm) or [{}]  # primary_model style: the llm section's settings
    bases = [str(model.get("api_base") or default_base) for model in models if _over_http(
        *(model[name] if model.get(name) is not None else llm.get(name)
          for name in ("manual_mode", "provider")))]
    if not (api_key_env or named) and all(_is_local(base) for base in bases):
        return LOCAL_KEY_PLACEHOLDER, variable
    raise ConfigError(
        f"no API key: set {variable} to your LLM provider's key (export {variable}=...), name "
        f"another variable with --api-key-env, or use a local OpenAI-compatible server with "
        f"--api-base http://localhost:8000/v1 (vLLM) or http://localhost:11434/v1 (ollama); "
        f"without an LLM, `tape tune` improves the tape policy"
    )


def _referenced_variable(value: Any) -> str | None:
    """VAR of an `api_key: ${VAR}` setting, else None."""
    reference = _VARIABLE_REFERENCE.match(str(value or ""))
    return reference.group(1) if reference else None


def _endpoints(config: Any, llm_section: Mapping[str, Any], variable: str) -> list[LLMEndpoint]:
    """The run's HTTP endpoints, each once, with the key and the variable it came from; every
    model's key is cleaned in `config` (`_clean_key`) on the way.

    `config.llm.models` (and `evaluator_models`) list the section's entries in order, then any
    `primary_model`/`secondary_model`, which use the section's key."""
    endpoints = []
    for kind in ("models", "evaluator_models"):
        entries = [entry for entry in llm_section.get(kind) or [] if isinstance(entry, dict)]
        for index, model in enumerate(getattr(config.llm, kind)):
            named = _referenced_variable(entries[index].get("api_key")) if index < len(
                entries) else None
            model_variable = named or variable
            if isinstance(model.api_key, str):
                model.api_key = _clean_key(model.api_key, model_variable)
            if kind == "models" and not getattr(model, "init_client", None) and _over_http(
                    getattr(model, "manual_mode", None), getattr(model, "provider", None)):
                endpoints.append(LLMEndpoint(str(model.api_base), model.api_key or "",
                                             model_variable))
    return list(dict.fromkeys(endpoints))


_COUNTS = ("max_iterations", "checkpoint_interval", "database.population_size",
           "database.num_islands", "evaluator.parallel_evaluations")
"""Settings that must be whole numbers of at least 1: OpenEvolve runs nothing with 0 iterations
and fails mid-run, with a traceback, on 0 islands, workers or checkpoint interval."""


def _check_counts(config: Any, path: Path) -> None:
    for name in _COUNTS:
        value = config
        for part in name.split("."):
            value = getattr(value, part)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} in OpenEvolve config {path} must be a whole number of at "
                              f"least 1, got {value!r}")


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
        parts = urlparse(llm.api_base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"--api-base {llm.api_base} is not an http(s) URL; give the "
                              "endpoint's base URL, e.g. http://localhost:8000/v1")
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
    _check_counts(config, path)
    return ResolvedConfig(config, saved, variable, _endpoints(config, llm_section, variable))
