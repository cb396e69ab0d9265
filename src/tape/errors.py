"""The package's errors: every user mistake raises a subclass of `TapeError` (a `ValueError`)."""

from __future__ import annotations

from numbers import Integral

__all__ = [
    "ConfigError",
    "EvolutionError",
    "IsolationError",
    "LayoutError",
    "PlacementError",
    "ProgramError",
    "TapeError",
    "TraceError",
    "checked_integer",
    "counted",
]


class TapeError(ValueError):
    """Base of TAPE's errors; the message says what was wrong and what was expected."""


class LayoutError(TapeError):
    """Cluster or layout arguments that cannot work together (for example S % G != 0)."""


class PlacementError(TapeError):
    """A placement (`phy2log`, `log2phy`, `logcnt`) that is malformed or inconsistent."""


class TraceError(TapeError):
    """A trace file or load array that cannot be read or used."""


class ConfigError(TapeError):
    """A config file or preset that is missing, malformed or has unknown keys."""


class ProgramError(TapeError):
    """A user program (a file defining `rebalance_experts`) that cannot be loaded or run."""


class IsolationError(TapeError):
    """A sandbox isolation that cannot run here (`isolation strict` without bubblewrap)."""


class EvolutionError(TapeError):
    """An evolution run in which the LLM produced no candidate program (unreachable endpoint,
    unknown model, answers in the wrong format)."""


MAX_INTEGER = 2**31 - 1
"""Largest count, size or seed `checked_integer` accepts (beyond it numpy overflows or a
policy would loop for ever)."""


def counted(number: int, noun: str) -> str:
    """A count and its noun for messages, plural unless the count is 1: "1 expert", "2 experts"."""
    return f"{number} {noun}{'' if int(number) == 1 else 's'}"


def checked_integer(value: object, name: str, error: type[TapeError], minimum: int = 1) -> int:
    """`value` as an int if it is an integer (not a bool) of at least `minimum`; else `error`
    saying "NAME must be a positive integer" (or "a non-negative integer", "an integer >= m"),
    or that it must be at most MAX_INTEGER."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        wanted = {1: "a positive integer", 0: "a non-negative integer"}.get(
            minimum, f"an integer >= {minimum}")
        raise error(f"{name} must be {wanted}, got {value!r}")
    if value > MAX_INTEGER:
        raise error(f"{name} must be at most {MAX_INTEGER}, got {value!r}")
    return int(value)
