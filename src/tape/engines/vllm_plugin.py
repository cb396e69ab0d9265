"""vLLM plugin: a TAPE policy as vLLM's EPLB policy `"default"` (package doc: when and how).

vLLM takes its policy class from `vllm.distributed.eplb.policy.EPLB_POLICIES` by the name in
`--eplb-config`'s `policy`, which accepts only `"default"`, and async EPLB (vLLM's default since
0.23) refuses any other name: so the plugin puts its class in the place of `"default"`. vLLM
calls the class method `rebalance_experts(weight, num_replicas, num_groups, num_nodes,
num_ranks, old_physical_to_logical_map)`, the old map as the 6th positional argument, all CPU
tensors, and wants CPU int64 back: `phy2log` alone from 0.19 on (it rebuilds its 1024-wide
`log2phy` buffer from it), the three maps of DeepSeek's entry point from 0.13 to 0.18.

- The old map is the placement in force, unless it is not a whole placement of the slots asked
  for (elastic EP changed the slot count: its width differs, or new slots hold -1): then the
  rebalancer's own memory for the new shape is used (none the first time: it starts afresh).
- A window with no load at all (the profile run's dummy rearrangement, before any traffic) is
  placed without being remembered, so it never becomes history for the forecast.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from tape.api import rebalance_experts
from tape.arrays import to_numpy
from tape.engines import EngineSetting, announce, engine_setting

__all__ = ["PHY2LOG_ONLY_FROM", "policy_class", "register", "returns_phy2log_only"]

PHY2LOG_ONLY_FROM = (0, 19)
"""The first vLLM version whose policies return `phy2log` alone (earlier ones: three maps)."""
LOGGER = "vllm.tape"
"""A child of vLLM's logger, so the line goes where vLLM's own go."""


def returns_phy2log_only(vllm_version: str) -> bool:
    """Whether vLLM `vllm_version` ("0.33.0", "0.19.0rc1.dev2+g1234") wants `phy2log` alone."""
    match = re.match(r"\s*v?(\d+)\.(\d+)", vllm_version)
    if match is None:
        return True  # an unreadable version: the current interface
    return (int(match[1]), int(match[2])) >= PHY2LOG_ONLY_FROM


def _installed_version() -> str:
    try:
        return version("vllm")
    except PackageNotFoundError:
        return ""


@cache
def policy_class() -> type:
    """`TapeEplbPolicy`, a subclass of vLLM's `AbstractEplbPolicy` (made once, on first use:
    it imports vLLM). Its `setting` is the `EngineSetting` that `register` gives it."""
    from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy

    phy2log_only = returns_phy2log_only(_installed_version())

    class TapeEplbPolicy(AbstractEplbPolicy):
        """vLLM's EPLB policy interface around a `tape.Rebalancer` (module doc)."""

        setting: EngineSetting | None = None

        @classmethod
        def rebalance_experts(cls, weight: Any, num_replicas: int, num_groups: int,
                              num_nodes: int, num_ranks: int,
                              old_global_expert_indices: Any | None = None) -> Any:
            """[L, E] loads (CPU tensor) in; `phy2log` [L, S] int64 out (three maps before
            vLLM 0.19)."""
            if cls.setting is None:
                raise RuntimeError("TapeEplbPolicy used before tape's vLLM plugin registered it")
            rebalancer = cls.setting.rebalancer
            in_force = _whole_placement(old_global_expert_indices, weight, num_replicas)
            if not to_numpy(weight).any():  # the profile run, or a window without traffic
                outputs = rebalance_experts(
                    weight, num_replicas, num_groups, num_nodes, num_ranks,
                    policy=rebalancer.policy, previous_phy2log=in_force, **rebalancer.params)
            else:
                outputs = rebalancer(weight, num_replicas, num_groups, num_nodes, num_ranks,
                                     previous_phy2log=in_force)
            return outputs[0] if phy2log_only else outputs

    return TapeEplbPolicy


def _whole_placement(old_map: Any | None, weight: Any, num_replicas: int) -> Any | None:
    """`old_map` when it places every one of the `num_replicas` slots of every layer, else
    None (elastic EP resized the slots)."""
    if old_map is None:
        return None
    array = to_numpy(old_map)
    if array.shape != (to_numpy(weight).shape[0], num_replicas) or (array < 0).any():
        return None
    return old_map


def register() -> None:
    """The `vllm.general_plugins` entry point: with `TAPE_EPLB_POLICY` set, TAPE's class is
    `EPLB_POLICIES["default"]`; without it, nothing. Idempotent."""
    setting = engine_setting()
    if setting is None:
        return
    from vllm.distributed.eplb.policy import EPLB_POLICIES

    policy = policy_class()
    policy.setting = setting
    EPLB_POLICIES["default"] = policy
    announce("vLLM", LOGGER, setting, 'EPLB_POLICIES["default"] is tape.TapeEplbPolicy')
