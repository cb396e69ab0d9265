"""Imports every built-in policy module, so that each registers itself."""

from tape.policies import (  # noqa: F401
    bldm,
    deepseek,
    min_moves,
    replicate_hot,
    tape,
    vanilla,
)

__all__: list[str] = []
