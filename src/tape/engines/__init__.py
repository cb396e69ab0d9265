"""Plugins that put a TAPE policy in charge of a serving engine's expert load balancer.

vLLM and SGLang load the plugins installed with them in every process that runs the model,
through entry points (`vllm.general_plugins`, `sglang.srt.plugins`; pyproject.toml names
`tape.engines.vllm_plugin:register` and `tape.engines.sglang_plugin:register`). A plugin does
nothing unless the environment variable `TAPE_EPLB_POLICY` is set:

- a preset of the `tape` policy: `all`, `balance`, `balance-migration`, `fast`, alone or with
  parameters (`fast:migration_weight=0.1`, or parameters alone: `migration_weight=0.1`);
- or a policy with parameters as `tape compare --policies` writes them: `tape:fast`,
  `tape:preset=all:migration_weight=0.1`, `deepseek`, ...

Then the plugin puts a `tape.Rebalancer` of that policy where the engine looks for its policy,
and logs one line through the engine's logger. A bad value stops the process with one line
(`SystemExit`), never a traceback: an engine told to use TAPE does not run on without it.

Each process keeps one `Rebalancer` per setting; loading a plugin again (engines do) changes
nothing. The plugins import the engine only when the variable is set, and tape's core never
imports this package.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from tape.errors import TapeError
from tape.policies import PolicyError, parse_policy_spec, policy_names
from tape.policies.tape import PRESETS
from tape.serving import Rebalancer

__all__ = ["ENVIRONMENT_VARIABLE", "EngineSetting", "announce", "engine_setting"]

ENVIRONMENT_VARIABLE = "TAPE_EPLB_POLICY"
"""The variable that turns the plugins on and names the policy."""


@dataclass(frozen=True)
class EngineSetting:
    """What `TAPE_EPLB_POLICY` asks for: its text, the policy spec as `compare --policies`
    writes it, and the process's rebalancer for it."""

    text: str
    spec: str
    rebalancer: Rebalancer

    @property
    def described(self) -> str:
        """"policy tape, preset all" and any other parameters, for the log line."""
        params = dict(self.rebalancer.params)
        parts = [f"policy {self.rebalancer.policy}"]
        if self.rebalancer.policy == "tape":
            parts.append(f"preset {params.pop('preset', 'all')}")
        parts += [f"{key}={value}" for key, value in params.items()]
        return ", ".join(parts)


_SETTINGS: dict[str, EngineSetting] = {}
"""By the variable's text: the setting made for it in this process (plugins load repeatedly)."""
_ANNOUNCED: set[tuple[str, str]] = set()
"""(engine, spec) pairs already logged in this process."""


def engine_setting() -> EngineSetting | None:
    """The setting `TAPE_EPLB_POLICY` asks for, None when it is unset or empty.

    Raises:
        SystemExit: one line naming the variable and what is wrong with its value (an unknown
            policy or preset, a parameter the policy does not take).
    """
    text = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if not text:
        return None
    if text in _SETTINGS:
        return _SETTINGS[text]
    first = text.split(":", 1)[0].strip()
    spec = f"tape:{text}" if first in PRESETS or "=" in first else text
    try:
        if first not in PRESETS and "=" not in first and first not in policy_names():
            raise PolicyError(f"{first!r} is neither a tape preset ({', '.join(PRESETS)}) nor a "
                              f"policy ({', '.join(policy_names())})")
        name, params = parse_policy_spec(spec)
        rebalancer = Rebalancer(name, **params)
    except TapeError as error:
        raise SystemExit(f"tape: {ENVIRONMENT_VARIABLE}={text!r}: {error} (expected a tape "
                         f"preset such as all or fast, or a policy as tape compare --policies "
                         f"takes it, such as tape:fast)") from None
    setting = _SETTINGS[text] = EngineSetting(text, spec, rebalancer)
    return setting


def announce(engine: str, logger_name: str, setting: EngineSetting, where: str) -> None:
    """Log once per process and engine that TAPE is in charge, with which policy and preset."""
    if (engine, setting.spec) in _ANNOUNCED:
        return
    _ANNOUNCED.add((engine, setting.spec))
    logging.getLogger(logger_name).info(
        "tape is in charge of %s's expert placement (%s; %s=%s): %s",
        engine, setting.described, ENVIRONMENT_VARIABLE, setting.text, where)
