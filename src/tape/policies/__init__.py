"""Placement policies, in a registry keyed by name.

A policy is a pure function, batched over layers:

    policy(weight, layout, **params) -> Placement
    policy(weight, layout, *, previous=None, history=None, **params) -> Placement

`weight[L, E]` (float64) is the load of the window to balance, `layout` the cluster. A policy
that keeps placements or forecasts also declares `previous`, the placement in force (or None),
and `history[W, L, E]`, the loads of earlier windows, oldest first (or None); `call_policy`
passes them only to a policy that declares them. Policies do no I/O and use seeded randomness
only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from tape.errors import TapeError
from tape.layout import Layout
from tape.placement import Placement

__all__ = [
    "Policy", "PolicyError", "call_policy", "check_params", "get_policy", "parse_policy_spec", "policy_names",
    "register",
]


class PolicyError(TapeError):
    """An unknown policy name, a name registered twice, or bad policy parameters."""


class Policy(Protocol):
    def __call__(self, weight: np.ndarray, layout: Layout, **params: Any) -> Placement: ...


def check_params(name: str, params: dict[str, Any]) -> None:
    """PolicyError unless policy `name` takes `params`: their names (by its signature) and, for
    a policy that has a `check_params(params)` attribute, their values, without placing."""
    function = get_policy(name)
    signature = inspect.signature(function)
    accepted = [
        parameter.name
        for parameter in signature.parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        and parameter.name not in ("previous", "history")
    ]
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD
                     for p in signature.parameters.values())
    unknown = sorted(set(params) - set(accepted))
    if unknown and not open_ended:
        takes = f"its parameters are: {', '.join(accepted)}" if accepted else "it takes none"
        raise PolicyError(
            f"policy {name!r} has no parameter {', '.join(map(repr, unknown))}; {takes}"
        )
    checker = getattr(function, "check_params", None)
    if checker is not None:
        checker(params)


def call_policy(
    function: Policy,
    weight: np.ndarray,
    layout: Layout,
    *,
    previous: Placement | None = None,
    history: np.ndarray | None = None,
    **params: Any,
) -> Placement:
    """`function(weight, layout, **params)`, with `previous` and `history` for a policy that
    declares them (module doc)."""
    declared = inspect.signature(function).parameters
    context = {name: value for name, value in (("previous", previous), ("history", history))
               if name in declared}
    return function(weight, layout, **context, **params)


_REGISTRY: dict[str, Policy] = {}


def register(name: str) -> Callable[[Policy], Policy]:
    """Decorator: register a policy under `name`; a name registered twice is an error."""

    def decorate(function: Policy) -> Policy:
        if name in _REGISTRY:
            raise PolicyError(f"policy {name!r} is already registered")
        _REGISTRY[name] = function
        return function

    return decorate


def _load_builtin() -> None:
    # Importing the modules registers their policies.
    from tape.policies import builtin  # noqa: F401


def get_policy(name: str) -> Policy:
    """The policy registered under `name`; `PolicyError` naming the known ones otherwise."""
    _load_builtin()
    known = ", ".join(sorted(_REGISTRY))
    if not isinstance(name, str):
        raise PolicyError(f"policy must be a policy name, got {name!r}; known policies: {known}")
    try:
        return _REGISTRY[name]
    except KeyError:
        hint = " (a policy's parameters are keyword arguments)" if ":" in name else ""
        raise PolicyError(f"unknown policy {name!r}{hint}; known policies: {known}") from None


def policy_names() -> list[str]:
    """Names of all registered policies, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A policy name and its parameters from `NAME[:PRESET][:KEY=VALUE...]`.

    For example "tape:fast" (preset "fast"), "tape:preset=all:migration_weight=0.1" or
    "min-moves:tolerance=0.05". A bare word after the name is the `preset` parameter; values that read
    as integers or floats become numbers, others stay strings. The name must be registered
    (`PolicyError` otherwise); whether the policy takes the parameters is checked when it runs.
    """
    name, *parts = [part.strip() for part in spec.strip().split(":")]
    get_policy(name)
    params: dict[str, Any] = {}
    for part in parts:
        key, equals, text = part.partition("=")
        if not equals:
            key, text = "preset", part
        key, text = key.strip(), text.strip()
        if not key or not text or not key.isidentifier():
            raise PolicyError(
                f"cannot read {part!r} in policy {spec!r}; expected NAME[:PRESET][:KEY=VALUE...],"
                f" for example tape:fast or tape:preset=all:migration_weight=0.1"
            )
        if key in params:
            raise PolicyError(f"parameter {key!r} is given twice in policy {spec!r}")
        params[key] = _number_or_text(text)
    return name, params


def _number_or_text(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
