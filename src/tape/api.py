"""Public entry points: `rebalance_experts`, a drop-in for DeepSeek EPLB, and `place`.

`rebalance_experts` takes DeepSeek EPLB's arguments (and vLLM's policy call) and returns its
three outputs, as torch tensors when given a torch tensor and as numpy arrays otherwise.
`place` is the same on TAPE's own types (a `Layout` in, a `Placement` out). Both check every
argument and every policy's output, and raise a `TapeError` subclass that says what was wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tape.arrays import dense_numpy, like_input
from tape.errors import PlacementError, TapeError, TraceError
from tape.layout import Layout
from tape.placement import Placement
from tape.policies import PolicyError, call_policy, check_params, get_policy
from tape.trace import check_load, check_loads

__all__ = ["place", "rebalance_experts"]


_NOT_PARAMETERS = {
    "previous": "give the placement in force as previous_phy2log",
    "layout": "give the cluster as num_replicas, num_groups, num_nodes and num_gpus",
}
"""`place`'s own arguments, which `rebalance_experts` would otherwise pass twice."""


def rebalance_experts(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    policy: str = "deepseek",
    previous_phy2log: Any | None = None,
    history: Any | None = None,
    **params: Any,
) -> tuple[Any, Any, Any]:
    """Place the experts of every layer: DeepSeek EPLB's entry point, with a choice of policy.

    Args:
        weight: [L, E] load of each logical expert (tokens), a torch tensor (any device) or an
            array-like; finite and non-negative.
        num_replicas: S, physical expert slots per layer; a multiple of `num_gpus`, at least E.
        num_groups: expert groups (consecutive ids); must divide E.
        num_nodes: N, server nodes; must divide `num_gpus`.
        num_gpus: G, GPUs.
        policy: a registered policy name (see `tape.policies.policy_names()`).
        previous_phy2log: optional [L, S] expert of each slot in the placement in force, for
            policies that limit expert moves (`tape`, `min-moves`). It is checked for every
            policy, also for those that ignore it (the other baselines): a wrong shape or an
            expert without a slot raises `PlacementError`.
        history: optional [W, L, E] loads of earlier windows, oldest first, for policies that
            forecast.
        **params: the policy's own parameters.

    Returns:
        phy2log: [L, S] int64, the logical expert of each slot.
        log2phy: [L, E, X] int64, the slots of each expert, padded with -1.
        logcnt: [L, E] int64, replicas of each expert.
        All three as torch tensors on `weight`'s device when `weight` is a torch tensor.
    """
    for name, instead in _NOT_PARAMETERS.items():
        if name in params:
            raise PolicyError(f"rebalance_experts has no parameter {name!r}; {instead}")
    load = check_load(weight)
    layout = Layout(num_replicas, num_groups, num_nodes, num_gpus)
    layout.check_experts(load.shape[1])
    previous = None
    if previous_phy2log is not None:
        previous = _previous_placement(previous_phy2log, load.shape, layout.num_replicas)
    placement = _place(load, layout, policy, previous, history, params)
    return tuple(like_input(array, weight) for array in placement.as_tuple())


def place(
    weight: Any,
    layout: Layout,
    policy: str = "deepseek",
    *,
    previous: Placement | None = None,
    history: Any | None = None,
    **params: Any,
) -> Placement:
    """The placement that `policy` gives `weight` on `layout`, checked.

    Args:
        weight: [L, E] load of each logical expert; finite and non-negative.
        layout: the cluster.
        policy: a registered policy name.
        previous: the placement in force (L layers, S slots, E experts), or None.
        history: optional [W, L, E] loads of earlier windows, oldest first.
        **params: the policy's own parameters.

    Returns:
        The policy's `Placement`, validated against `layout` and L.
    """
    return _place(check_load(weight), layout, policy, previous, history, params)


def _place(load: np.ndarray, layout: Layout, policy: str, previous: Placement | None,
           history: Any | None, params: dict[str, Any]) -> Placement:
    """`place` of a load checked by `check_load` (at `place`'s or `rebalance_experts`' door)."""
    num_layers, num_experts = load.shape
    layout.check_experts(num_experts)
    function = get_policy(policy)
    check_params(policy, params)
    if previous is not None and (
        previous.num_layers != num_layers
        or previous.num_slots != layout.num_replicas
        or previous.num_experts != num_experts
    ):
        raise PlacementError(
            f"the previous placement has {previous.num_layers} layers, {previous.num_slots} "
            f"slots and {previous.num_experts} experts; expected {num_layers} layers, "
            f"{layout.num_replicas} slots and {num_experts} experts"
        )
    past = None
    if history is not None:
        past = check_loads(history, source="history", unit="window")
        if past.shape[1:] != load.shape:
            raise TraceError(
                f"history must have shape [windows, {num_layers}, {num_experts}], "
                f"got {list(past.shape)}"
            )
    placement = call_policy(function, load, layout, previous=previous, history=past, **params)
    if not isinstance(placement, Placement):
        raise PolicyError(f"policy {policy!r} returned {type(placement).__name__}, not a Placement")
    if placement.num_experts != num_experts:
        raise PlacementError(
            f"policy {policy!r} placed {placement.num_experts} experts, expected {num_experts}"
        )
    return placement.validate(layout, num_layers)


"""The largest load taken: above it float64 no longer holds every whole token count, so loads
that differ would compare equal and placements would be silently wrong."""


def _previous_placement(value: Any, load_shape: tuple[int, int], num_replicas: int) -> Placement:
    """`previous_phy2log` as a Placement, or a PlacementError that names it and its shape."""
    num_layers, num_experts = load_shape
    try:
        array = dense_numpy(value, "previous_phy2log", PlacementError)
    except ValueError as error:
        if isinstance(error, TapeError):
            raise
        raise PlacementError(
            f"previous_phy2log must be a rectangular array [layers, num_replicas] = "
            f"[{num_layers}, {num_replicas}], got ragged nested sequences"
        ) from None
    if array.shape != (num_layers, num_replicas):
        raise PlacementError(
            f"previous_phy2log must have shape [layers, num_replicas] = [{num_layers}, "
            f"{num_replicas}] (the layers of weight, one expert id per slot), got "
            f"{list(array.shape)}"
        )
    try:
        return Placement(array, num_experts)
    except PlacementError as error:
        message = str(error)
        message = (
            message.replace("phy2log", "previous_phy2log", 1)
            if message.startswith("phy2log ")
            else f"previous_phy2log: {message}"
        )
        raise PlacementError(message) from None
