"""Imports every built-in policy module, so that each registers itself."""

from tape.policies import bldm, deepseek, min_moves, replicate_hot, vanilla  # noqa: F401
