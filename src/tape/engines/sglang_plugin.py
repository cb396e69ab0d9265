"""SGLang plugin: a TAPE policy as SGLang's `eplb_algorithms.rebalance_experts` (package doc).

SGLang's `ExpertLocationMetadata.init_by_eplb` calls its algorithms through the module,
`eplb_algorithms.rebalance_experts(tokens_per_expert=, num_physical_experts=,
num_local_physical_experts=, num_groups=, num_nodes=, algorithm=)`, so the plugin puts its
function in that module attribute. What it takes and gives:

- `tokens_per_expert`: `logical_count` [T, L, E], per forward step, on the GPU; L counts every
  layer of the model, dense ones included (61 rows for DeepSeek-V3, whose first 3 carry no
  load); summed over T. The three maps come back on its device (SGLang pads `log2phy` to the
  slot count itself).
- `num_groups=None` (a model without groups) is one group.
- `algorithm`: any `deepseek*` one (and `auto`, which SGLang resolves to one) is TAPE's. The
  `elasticity_aware*` ones are for ranks that may be down: TAPE places only when every rank
  is up (SGLang's elastic-EP state says so, or there is none); otherwise SGLang's own
  algorithm places, so that TAPE never puts an expert on a dead rank.
"""

from __future__ import annotations

from typing import Any

from tape.engines import EngineSetting, announce, engine_setting

__all__ = ["rebalance_experts", "register"]

LOGGER = "sglang.tape"
"""A child of SGLang's logger, so the line goes where SGLang's own go."""

_state: dict[str, Any] = {"setting": None, "engine_own": None}
"""The setting `register` gave, and SGLang's own `rebalance_experts` it replaced."""


def rebalance_experts(tokens_per_expert: Any, num_physical_experts: int,
                      num_local_physical_experts: int, num_groups: int | None, num_nodes: int,
                      algorithm: Any = None) -> tuple[Any, Any, Any]:
    """SGLang's `eplb_algorithms.rebalance_experts`, placed by TAPE (module doc).

    Args:
        tokens_per_expert: [T, L, E] (or [L, E]) tokens of each logical expert, any device.
        num_physical_experts: S, slots per layer.
        num_local_physical_experts: slots per GPU (G = S / this).
        num_groups: expert groups, or None for one.
        num_nodes: N.
        algorithm: SGLang's `EplbAlgorithm` (or None).

    Returns:
        phy2log [L, S], log2phy [L, E, X] and logcnt [L, E], int64, on the input's device.
    """
    setting: EngineSetting | None = _state["setting"]
    if setting is None:
        raise RuntimeError("tape's rebalance_experts used before tape's SGLang plugin "
                           "registered it")
    num_gpus = num_physical_experts // num_local_physical_experts
    name = getattr(algorithm, "name", str(algorithm))
    if name.startswith("elasticity_aware") and not _every_rank_up(num_gpus):
        return _state["engine_own"](
            tokens_per_expert=tokens_per_expert, num_physical_experts=num_physical_experts,
            num_local_physical_experts=num_local_physical_experts, num_groups=num_groups,
            num_nodes=num_nodes, algorithm=algorithm)
    return setting.rebalancer(tokens_per_expert, num_physical_experts, num_groups, num_nodes,
                              num_gpus)


def _every_rank_up(num_gpus: int) -> bool:
    """True when SGLang's elastic-EP state marks the first `num_gpus` ranks active, or it has
    none (every rank is then up, as SGLang itself assumes)."""
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager

    state = ElasticEPStateManager.instance()
    if state is None:
        return True
    active = getattr(state, "active_ranks", None)
    if active is None or len(active) < num_gpus:
        return False
    return bool(active[:num_gpus].bool().all())


def register() -> None:
    """The `sglang.srt.plugins` entry point: with `TAPE_EPLB_POLICY` set,
    `sglang.srt.eplb.eplb_algorithms.rebalance_experts` is TAPE's; without it, nothing.
    Idempotent."""
    setting = engine_setting()
    if setting is None:
        return
    from sglang.srt.eplb import eplb_algorithms

    if eplb_algorithms.rebalance_experts is not rebalance_experts:
        _state["engine_own"] = eplb_algorithms.rebalance_experts
        eplb_algorithms.rebalance_experts = rebalance_experts
    _state["setting"] = setting
    announce("SGLang", LOGGER, setting,
             "sglang.srt.eplb.eplb_algorithms.rebalance_experts is tape's")
