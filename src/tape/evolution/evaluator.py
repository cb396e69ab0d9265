"""OpenEvolve's evaluation file for TAPE: `evaluate(program_path)` scores one candidate program.

OpenEvolve loads this file by path in each of its worker processes and calls `evaluate` with a
temporary file holding the candidate. The candidate runs in `tape.sandbox` (its own process, a
hard timeout, a memory limit, one window per call) through the evaluation protocol: rebalance on
window i, score on window i + 1. A candidate that fails scores 0 and the reason comes back as
the artifact `failure_reason`, which OpenEvolve shows the LLM in its next prompt.

What to score on comes from `TAPE_*` environment variables (`tape.settings.
ENVIRONMENT`), which OpenEvolve passes on to its workers; `configure(...)` sets them from Python.
To use this file with OpenEvolve's own command line:

    export TAPE_VERSION=2 TAPE_TRACE=expert-load.json
    openevolve-run initial_program.py "$(python -c 'import tape.evolution.evaluator as e;
        print(e.__file__)')" --config gemini.yaml
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from openevolve.evaluation_result import EvaluationResult

from tape.evolution.prompts import version_metrics
from tape.protocol import ProgramScore, score_program
from tape.settings import ENVIRONMENT, Settings

__all__ = ["candidate_metrics", "configure", "evaluate", "score_candidate"]


def _leave_ctrl_c_to_the_parent() -> None:
    """In an OpenEvolve worker (a child process), ignore SIGINT. Ctrl-C reaches the terminal's
    whole process group; `tape evolve`, the parent, stops the run and ends its workers, while a
    worker interrupted in the middle of Python code would print a KeyboardInterrupt traceback
    (about one Ctrl-C in ten). The evaluator in the parent itself keeps SIGINT."""
    import multiprocessing
    import signal

    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


_leave_ctrl_c_to_the_parent()  # OpenEvolve loads this file in every worker: its set-up is here


def configure(**settings: Any) -> Settings:
    """Set what `evaluate` scores on, in this process and in every process it starts.

    Takes the fields of `Settings` (version, trace, interval, replicas, ...), checks
    them, and writes them to `os.environ` as `TAPE_*` variables (clearing those not given), so
    that OpenEvolve's worker processes see them too. Returns the checked settings.
    """
    checked = Settings(**settings)
    for variable in ENVIRONMENT.values():
        os.environ.pop(variable, None)
    os.environ.update(checked.to_environment())
    return checked


def score_candidate(program_path: str | Path, settings: Settings) -> ProgramScore:
    """Run the program through the protocol in the sandbox; all metrics, or the failure reason."""
    model, cluster = settings.specs()
    return score_program(
        program_path, settings.windows(), settings.layout(), version=settings.version,
        timeout_s=settings.timeout_s, memory_mb=settings.memory_mb, budget_s=settings.budget_s,
        isolation=settings.isolation, model=model,
        cluster=cluster, dispatch=settings.dispatch, steps_per_window=settings.window_steps(),
    )


def candidate_metrics(score: ProgramScore, version: int | str) -> dict[str, float]:
    """What OpenEvolve sees: `combined_score`, the metrics it is made of, and `avg_raw_time`.

    A failed program gets 0.0 for each (and no runtime). A metric the run could not measure
    (migration needs two pairs) is left out.
    """
    names = ("combined_score", *version_metrics(version))
    if score.error is not None:
        return dict.fromkeys(names, 0.0)
    return {
        name: float(score.metrics[name])
        for name in (*names, "avg_raw_time") if name in score.metrics
    }


def evaluate(program_path: str) -> EvaluationResult:
    """OpenEvolve's entry point: score the program at `program_path` under the TAPE settings.

    Returns:
        EvaluationResult whose metrics hold `combined_score` (0.0 for a failed program) and the
        version's metrics; a failed program's artifacts hold `failure_reason` (one line).

    Raises:
        TapeError: the settings themselves are wrong (bad variable, missing trace).
    """
    settings = Settings.from_environment()
    score = score_candidate(program_path, settings)
    artifacts = {} if score.error is None else {"failure_reason": score.error}
    return EvaluationResult(metrics=candidate_metrics(score, settings.version), artifacts=artifacts)
