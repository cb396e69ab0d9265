"""The LLM's instructions and the starting program, read from `tape/evolve_assets/`.

`system_message.txt` states the problem and the rules with an `{objective}` slot;
`objectives.yaml` says, per scoring version, what `combined_score` is and describes each metric
it combines. `initial_program.py` is the program evolution starts from.
"""

from __future__ import annotations

import textwrap
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from tape.errors import ConfigError
from tape.protocol import VERSIONS, parse_version

__all__ = ["initial_program_text", "objective", "system_message", "version_metrics"]

def _asset_text(name: str) -> str:
    return resources.files("tape").joinpath("evolve_assets", name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _objectives() -> dict[str, Any]:
    data = yaml.safe_load(_asset_text("objectives.yaml"))
    if set(data["versions"]) != {str(version) for version in VERSIONS}:
        raise ConfigError("evolve_assets/objectives.yaml must describe every scoring version")
    return data


def version_metrics(version: int | str) -> tuple[str, ...]:
    """The metrics that `version`'s combined score is made of, e.g. v2: balancedness, comm."""
    return tuple(_objectives()["versions"][str(parse_version(version))]["metrics"])


def objective(version: int | str) -> str:
    """The paragraph that tells the LLM what `version` rewards: the formula, then each metric."""
    version = parse_version(version)
    entry = _objectives()["versions"][str(version)]
    name = "realistic model" if version == "realistic" else f"version {version}"
    paragraphs = [f"Objective (TAPE {name}): maximize combined_score = {entry['formula']}."]
    for metric in entry["metrics"]:
        paragraphs.append(f"- {metric}: {_objectives()['metrics'][metric]}")
    return "\n".join(textwrap.fill(text, width=96, subsequent_indent="  ") for text in paragraphs)


def system_message(version: int | str) -> str:
    """The system message for evolving a policy under `version`."""
    return _asset_text("system_message.txt").replace("{objective}", objective(version))


def initial_program_text() -> str:
    """The source of the program evolution starts from (DeepSeek EPLB's policy, in numpy)."""
    return _asset_text("initial_program.py")
