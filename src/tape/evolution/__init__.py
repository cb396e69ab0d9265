"""Searching for better placement policies: with an LLM (OpenEvolve) or by tuning parameters.

Modules (none is imported here; OpenEvolve and Optuna are optional extras, imported where used):

    settings   `EvaluationSettings`: version, windows, layout, limits, presets; as TAPE_* variables.
    evaluator  OpenEvolve's evaluation file: `evaluate(program_path)` -> metrics + artifacts.
    prompts    the system message for a scoring version and the initial program (package data).
    configs    OpenEvolve configs: shipped ones, strict loading, the command line, the API key.
    run        `tape evolve`: an OpenEvolve run with TAPE's evaluator, prompts and configs.
    tune       `tape tune`: Optuna over the `tape` policy's parameters, no LLM needed.
"""

__all__: list[str] = []
