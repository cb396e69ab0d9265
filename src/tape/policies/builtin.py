"""Imports every built-in policy module, so that each registers itself."""

from tape.policies import deepseek  # noqa: F401
