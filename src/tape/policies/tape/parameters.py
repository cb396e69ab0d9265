"""The `tape` policy's parameters: one `Parameter` each, with its help, its value in every
preset, its valid range and the range `tape tune` searches.

`PARAMETERS` is the one home of these facts; `PARAMETER_HELP`, `SEARCH_SPACE` and `PRESETS` are
read from it (the dictionaries that the tuner, the serving code and the tests use), and
`settings` checks a preset and its overrides against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from tape.policies import PolicyError

__all__ = [
    "PARAMETERS",
    "PARAMETER_HELP",
    "PRESETS",
    "PRESET_NAMES",
    "SEARCH_SPACE",
    "Parameter",
    "settings",
]

PRESET_NAMES = ("balance", "balance-migration", "all", "fast")
"""Parameter sets per objective: balance only; balance and migration; all three (default);
balance and migration at the least runtime (no forecast backtest, no locality terms, one round
of swaps)."""

# Charges and rounds far beyond any useful value would overflow the costs' arithmetic.
_NO_BOUND = 1e6


@dataclass(frozen=True)
class Parameter:
    """One parameter of `tape`.

    Attributes:
        name: its keyword.
        help: what it does, one line (docs/tape-policy.md says more).
        presets: its value in each preset of `PRESET_NAMES`, in that order.
        search: (low, high, kind) that `tape tune` searches; kind "float", "int" or "log".
        low, high: the valid range, both ends included (but `low_open`).
        low_open: `low` itself is not valid.
        integer: it takes integers only.
    """

    name: str
    help: str
    presets: tuple[float | int, ...]
    search: tuple[float, float, str]
    low: float = 0.0
    high: float = _NO_BOUND
    low_open: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        assert len(self.presets) == len(PRESET_NAMES), self.name

    def checked(self, value: Any) -> float | int:
        """`value` as the parameter's type; PolicyError unless it is valid."""
        kind = Integral if self.integer else Real
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
            expected = "an integer" if self.integer else "a finite number"
            raise PolicyError(f"tape parameter {self.name} must be {expected}, got {value!r}")
        if not (self.low < value if self.low_open else self.low <= value) or value > self.high:
            bounds = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
            raise PolicyError(f"tape parameter {self.name} must be in {bounds}, got {value!r}")
        return int(value) if self.integer else float(value)


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("smoothing_floor",
              "least weight the forecast may give the newest window (1: newest only)",
              (0.3, 0.3, 0.3, 1.0), (0.1, 1.0, "float"), high=1.0, low_open=True),
    Parameter("node_spread",
              "worth of an inter-node token a replica saves by putting its expert in one more "
              "node (load / N tokens)",
              (0.0, 0.0, 0.0, 0.0), (0.0, 12.0, "float")),
    Parameter("keep_margin", "bonus of an existing replica when counting replicas, x mean GPU load",
              (0.0, 0.08, 0.1, 0.1), (0.0, 0.3, "float")),
    Parameter("migration_weight",
              "charge per moved expert (one expert's weights), x mean slot load (mean GPU load "
              "/ slots per GPU)",
              (0.0, 0.27, 0.1, 0.36), (0.018, 1.8, "log")),
    Parameter("locality_weight",
              "charge per inter-node token, relative to the layer's total tokens",
              (0.0, 0.0, 150.0, 0.0), (0.0, 200.0, "float")),
    Parameter("tolerance", "a layer within (1 + tolerance) x mean GPU load is left as it is",
              (0.0, 0.03, 0.0, 0.0), (0.0, 0.1, "float")),
    Parameter("search_rounds", "most rounds of swaps", (32, 8, 3, 1), (0, 48, "int"),
              integer=True),
    Parameter("pairs_per_round", "heavy/light GPU pairs tried per round (at most G / 2 are used)",
              (4, 4, 4, 8), (1, 8, "int"), low=1, integer=True),
    Parameter("copy_budget",
              "most weight copies the swaps may leave in a layer, as a fraction of its slots "
              "(1: no budget); the peak rounds pool what the layers leave unused",
              (1.0, 1.0, 0.075, 1.0), (0.02, 1.0, "float"), high=1.0),
    Parameter("peak_rounds",
              "with a previous placement, most rounds of swaps of each layer's heaviest GPU "
              "with its best partner among the lightest (0: none)",
              (0, 0, 8, 0), (0, 32, "int"), integer=True),
    Parameter("keep_balancedness",
              "a layer the placement in force balances at least this well (forecast GPU "
              "balancedness) is not replanned (1: replan every layer)",
              (1.0, 1.0, 1.0, 1.0), (0.3, 1.0, "float"), high=1.0),
)
"""Every parameter of `tape`, in the order the docs list them."""

_BY_NAME = {parameter.name: parameter for parameter in PARAMETERS}

PARAMETER_HELP: dict[str, str] = {p.name: p.help for p in PARAMETERS}
"""What each parameter does, one line each (read from `PARAMETERS`)."""

SEARCH_SPACE: dict[str, tuple[float, float, str]] = {p.name: p.search for p in PARAMETERS}
"""Ranges for tuning (`tape tune`): name -> (low, high, kind) (read from `PARAMETERS`)."""

PRESETS: dict[str, dict[str, float | int]] = {
    preset: {p.name: p.presets[index] for p in PARAMETERS}
    for index, preset in enumerate(PRESET_NAMES)
}
"""Each preset's parameter values (read from `PARAMETERS`)."""


def settings(preset: str, params: dict[str, Any]) -> dict[str, float | int]:
    """The preset's parameters overridden by `params`; PolicyError for anything invalid."""
    if preset not in PRESETS:
        raise PolicyError(
            f"unknown tape preset {preset!r}; expected one of {', '.join(PRESET_NAMES)}")
    unknown = sorted(set(params) - set(_BY_NAME))
    if unknown:
        raise PolicyError(
            f"unknown tape parameter(s) {', '.join(unknown)}; expected any of "
            f"{', '.join(_BY_NAME)}"
        )
    chosen = dict(PRESETS[preset])
    for name, value in params.items():
        chosen[name] = _BY_NAME[name].checked(value)
    return chosen
