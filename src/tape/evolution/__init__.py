"""Searching for better placement policies: with an LLM (OpenEvolve) or by tuning parameters.

What they score on is a `tape.settings.Settings` (TAPE_* variables in OpenEvolve's workers).

Modules (none is imported here; OpenEvolve and Optuna are optional extras, imported where used):

    evaluator  OpenEvolve's evaluation file: `evaluate(program_path)` -> metrics + artifacts.
    prompts    the system message for a scoring version and the initial program (package data).
    configs    OpenEvolve configs: shipped ones, strict loading, the command line, the API key.
    run        `tape evolve`: an OpenEvolve run with TAPE's evaluator, prompts and configs.
    tune       `tape tune`: Optuna over the `tape` policy's parameters, no LLM needed.

`require_extra(module, command)` imports one of the extras or says how to install it.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["EXTRA_INSTALL", "require_extra"]

EXTRA_INSTALL = "pip install -e '.[evolve]' in a checkout of TAPE"
"""How to install the `evolve` extra (OpenEvolve and Optuna)."""


def require_extra(module: str, command: str) -> ModuleType:
    """Import `module` (openevolve or optuna) for `command`; TapeError saying how to install the
    `evolve` extra if it (or a package it needs) is missing, instead of a traceback."""
    import importlib

    from tape.errors import TapeError

    try:
        return importlib.import_module(module)
    except ImportError as error:
        if error.name == module:
            problem = f"{module} is not installed"
        else:  # the package is there but something it imports is not
            problem = f"{module} cannot be imported ({error})"
        raise TapeError(f"{command} needs the evolve extra, but {problem}; install it with "
                        f"{EXTRA_INSTALL}") from None
