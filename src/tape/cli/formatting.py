"""How the CLI's tables write numbers."""

from __future__ import annotations

import math

__all__ = ["format_value"]


def format_value(value: float, digits: int = 4) -> str:
    """A metric for a table: `digits` significant digits, large numbers with a k/M/G/T suffix."""
    if math.isnan(value):
        return "nan"
    magnitude = abs(value)
    if magnitude >= 1e4:
        # the smallest suffix whose number, rounded, is below 1000 (999,999 is "1M", not
        # "1e+03k"); beyond T, or infinite, in scientific notation
        for divisor, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
            text = f"{value / divisor:.{digits}g}"
            if "e" not in text and abs(float(text)) < 1000:
                return text + suffix
        return f"{value:.{digits}g}"
    if value == int(value) or magnitude >= 10 ** (digits - 1):
        return f"{value:.0f}"
    return f"{value:.{digits}g}"
