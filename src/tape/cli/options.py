"""The options the evaluation commands share, declared once, and the `Settings` they make.

`@with_settings(...)` gives a command every shared option (the trace, the layout, the presets,
and as asked the scoring version and the sandbox's limits) and calls it with one
`tape.settings.Settings` in place of them: a command declares only its own options, and every
default is the one `Settings` has.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

from tape.errors import MAX_INTEGER
from tape.settings import Settings

__all__ = ["MAX_TIMEOUT_S", "ScoringOption", "at_most", "with_settings"]

MAX_TIMEOUT_S = 86400
"""The largest --timeout, one day: Python's waits refuse an infinite timeout, or one of about 25
days and more, with a traceback."""


def at_most(limit: int, unit: str) -> Any:
    """An option callback refusing a value above `limit` (a usage error, as typer's `min`):
    typer's own `max` would widen the help's option column with the range, and cut lines."""

    def check(value: float | None) -> float | None:
        if value is not None and value > limit:
            raise typer.BadParameter(f"at most {limit}{unit}, got {value}{unit}")
        return value

    return check


# Settings' field defaults, read from the dataclass without making one (which would import the
# synthetic trace's model at the command line's start-up).
_DEFAULTS = SimpleNamespace(**{field.name: field.default for field in dataclasses.fields(Settings)})

ScoringOption = Annotated[
    str, typer.Option("--scoring", help="Scoring version: 0, 2, 3, 4 (the seed's) or "
                      "realistic.")
]

_TRACE: list[tuple[str, Any, Any]] = [
    ("trace", Annotated[
        Path | None, typer.Option("--trace", help="Expert-load trace: expert-load.json, a folder "
                                  "of per-layer CSVs, an SGLang .pt dump, or .npy/.npz \\[steps, "
                                  "layers, experts]; default: the synthetic trace in the "
                                  "--model's shape.")], None),
    ("interval", Annotated[int, typer.Option("--interval", min=1, help="Steps per window.")],
     _DEFAULTS.interval),
    ("seed", Annotated[int, typer.Option("--seed", min=0, help="Seed of the synthetic trace.")],
     _DEFAULTS.seed),
    ("synthetic_model", Annotated[
        str, typer.Option("--synthetic-model", help="Model of the synthetic trace: calibrated "
                          "(against the public trace's figures) or surges (unpredictable "
                          "single-expert surges).")], _DEFAULTS.synthetic_model),
    ("no_cache", Annotated[
        bool, typer.Option("--no-cache", help="Parse --trace anew and keep nothing in the trace "
                           "cache (TAPE_CACHE_DIR, default the user's cache folder).")], False),
]
_LAYOUT: list[tuple[str, Any, Any]] = [
    ("replicas", Annotated[
        int | None, typer.Option("--replicas", help="Physical slots per layer (S); default: "
                                 "one more a GPU than the experts need, G * (ceil(E / G) + 1).")],
     _DEFAULTS.replicas),
    ("groups", Annotated[
        int | None, typer.Option("--groups", help="Expert groups; default: the --model's (1 "
                                 "for a model without group-limited routing).")],
     _DEFAULTS.groups),
    ("nodes", Annotated[
        int | None, typer.Option("--nodes", help="Nodes (N); default: GPUs / the cluster "
                                 "preset's GPUs per node.")], _DEFAULTS.nodes),
    ("gpus", Annotated[int, typer.Option("--gpus", help="GPUs (G).")], _DEFAULTS.gpus),
    ("model", Annotated[
        str | None, typer.Option("--model", help="MoE model preset: the shape of the synthetic "
                                 "trace, the layout and the cost model: deepseek-v3, kimi-k2, "
                                 "qwen3-235b-a22b, qwen3-30b-a3b, gpt-oss-120b, gpt-oss-20b, "
                                 "glm-4.5, glm-4.5-air or llama-4-maverick (default: the --config "
                                 "file's model: preset:, else deepseek-v3).")], _DEFAULTS.model),
    ("cluster", Annotated[
        str | None, typer.Option("--cluster", help="Cluster preset: h800, h100, h200, b200 or "
                                 "gb200-nvl72; its GPUs per node make the default --nodes "
                                 "(default: the --config file's cluster: preset:, else h800).")],
     _DEFAULTS.cluster),
    ("config", Annotated[
        Path | None, typer.Option("--config", help="YAML/JSON file overriding model: and "
                                  "cluster: preset fields.")], _DEFAULTS.config),
    ("dispatch", Annotated[
        str, typer.Option("--dispatch", help="Token dispatch of the cost model: locality or "
                          "uniform.")], _DEFAULTS.dispatch),
]
_SCORING: list[tuple[str, Any, Any]] = [("scoring", ScoringOption, "0")]
_SANDBOX: list[tuple[str, Any, Any]] = [
    ("timeout", Annotated[
        float, typer.Option("--timeout", min=0.1, callback=at_most(MAX_TIMEOUT_S, " s"),
                            help="Seconds one call of a program may take before its process is "
                            "killed (at most a day).")], _DEFAULTS.timeout_s),
    ("memory_mb", Annotated[
        # more than MAX_INTEGER MB cannot be set as the process's limit (in bytes)
        int, typer.Option("--memory-mb", min=64, callback=at_most(MAX_INTEGER, " MB"),
                          help="Memory a program's process may allocate, MB.")],
     _DEFAULTS.memory_mb),
    ("budget", Annotated[
        float | None, typer.Option("--budget", min=0.1, callback=at_most(MAX_TIMEOUT_S, " s"),
                                   help="Seconds all calls of one program may take together "
                                   "(default 5 x --timeout); past it the program fails.")],
     _DEFAULTS.budget_s),
    ("isolation", Annotated[
        str, typer.Option("--isolation", help="How programs are isolated: auto (bubblewrap "
                          "where it runs, else partial isolation and a warning), strict "
                          "(bubblewrap, or refuse to run) or partial.")], _DEFAULTS.isolation),
]


def _settings(values: dict[str, Any]) -> Settings:
    """The `Settings` of the shared options' values (those a command has)."""
    renamed = {"no_cache": "cache", "scoring": "version", "timeout": "timeout_s",
               "budget": "budget_s"}
    fields = {renamed.get(name, name): value for name, value in values.items()}
    if "cache" in fields:
        fields["cache"] = not fields["cache"]
    return Settings(**fields)


def with_settings(*, scoring: bool = True, sandbox: bool = True) -> Callable[[Any], Any]:
    """Decorator: the command gets the shared options (trace, layout and presets; the scoring
    version with `scoring`; --timeout, --memory-mb, --budget and --isolation with `sandbox`),
    and its parameter `settings` receives the `Settings` they make."""
    shared = _TRACE + _LAYOUT + (_SCORING if scoring else []) + (_SANDBOX if sandbox else [])
    names = [name for name, _, _ in shared]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command, include_extras=True)
        own = [parameter.replace(annotation=hints.get(parameter.name, parameter.annotation))
               for parameter in inspect.signature(command).parameters.values()
               if parameter.name != "settings"]
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                   annotation=annotation) for name, annotation, default in shared]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return command(*args, settings=_settings(values), **kwargs)

        parameters = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                      if p.kind is inspect.Parameter.VAR_KEYWORD else p for p in own] + added
        wrapper.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate
