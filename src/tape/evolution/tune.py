"""`tape tune`: tune the `tape` policy's parameters with Optuna, no LLM needed.

Each trial runs the policy with the trial's parameters through the evaluation protocol on the
same windows, layout and scoring version as `tape evolve` (`Settings`), and Optuna's
TPE sampler (seeded) maximizes `combined_score`. The policy's presets are tried first (clipped
into the search ranges, as many as there are trials), so the result is never worse than the best
of those on the tuning windows; on held-out windows it may score below the policy's defaults
(`TuneResult.tuned_below_defaults`).

With `holdout > 0` the last windows are kept out of tuning: the tuned parameters, the policy's
defaults and the `deepseek` policy are then compared on windows the search never saw, so a
reported gain is not an artifact of fitting the tuning windows.

Outputs (`write_outputs`): `best_params.json`, `tuned_program.py` (a `rebalance_experts` file
that calls `tape.api.rebalance_experts(..., policy="tape", **params)`, usable wherever a program
is expected, e.g. `tape evaluate` or `tape evolve --initial`) and `tune_manifest.json`
(settings, the finished trials, full scores, whether Ctrl-C stopped the search, and whether the
comparison was made: `"compared": false` and no scores when Ctrl-C stopped it).

With `storage` (an SQLAlchemy URL: `tape tune` uses `sqlite:///OUT/study.db` by default, or
`--storage postgresql://...`) the study lives in Optuna's RDB storage: each trial is stored as
it finishes, so a killed run loses at most the trial in flight, and `resume` continues it.
Several processes (machines) given the same storage and `resume` tune one study together, in
Optuna's distributed mode, until `trials` trials have finished in all. The study remembers what
it tunes (policy, search space, held-out share, settings): resuming with others is an error.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tape.errors import ConfigError
from tape.files import CommitError, require_new_folder, staged_folder, write_json_atomic
from tape.protocol import ProgramScore, score_policy
from tape.settings import Settings

__all__ = ["STUDY_FILE", "STUDY_NAME", "SearchSpace", "TuneResult", "hide_password",
           "split_windows", "tune",
           "tuned_program_text", "write_outputs"]

STUDY_NAME = "tape-tune"
"""The study's name in its storage."""

STUDY_FILE = "study.db"
"""The SQLite file `tape tune` keeps its study in, in --out, unless --storage is given."""

TIMING_REPEATS = 3
"""Each policy call is timed by the fastest of this many (speed scores of versions 0, 3, 4 and
realistic): single timings on a busy machine vary by tens of percent and would pick noise."""

SearchSpace = dict[str, tuple[float, float, str]]
"""Parameter name -> (low, high, kind), kind one of "float", "int", "log" (log-uniform float)."""

_KINDS = ("float", "int", "log")


@dataclass
class TuneResult:
    """A tuning run's outcome.

    Attributes:
        policy: the tuned policy's name.
        best_params: the best trial's parameters.
        tuned: the policy with `best_params`, scored on the evaluation windows (None: the
            comparison was interrupted, as are `defaults` and `deepseek` then).
        defaults: the policy with its default parameters, on the evaluation windows.
        deepseek: the `deepseek` policy, on the evaluation windows.
        trials: each finished trial's number, parameters and combined score on the tuning
            windows (a trial that was queued but never ran, or was interrupted, is left out).
        tuning_windows: how many windows the search scored on.
        evaluation_windows: how many windows the comparison scored on (the same windows when
            nothing was held out).
        interrupted: Ctrl-C stopped the search before all its trials ran (the result is that
            of the finished ones) or stopped the comparison (`compared` is False).
    """

    policy: str
    best_params: dict[str, Any]
    tuned: ProgramScore | None = None
    defaults: ProgramScore | None = None
    deepseek: ProgramScore | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)
    tuning_windows: int = 0
    evaluation_windows: int = 0
    interrupted: bool = False

    @property
    def compared(self) -> bool:
        """The tuned parameters, the defaults and deepseek were all scored."""
        return None not in (self.tuned, self.defaults, self.deepseek)

    @property
    def tuned_below_defaults(self) -> bool:
        """The tuned parameters score below the policy's defaults on the evaluation windows."""
        return self.compared and (self.tuned.metrics["combined_score"]
                                  < self.defaults.metrics["combined_score"])


def split_windows(num_windows: int, holdout: float) -> tuple[slice, slice]:
    """Tuning windows (the first ones) and evaluation windows (the last `holdout` share).

    With `holdout` 0 both are all the windows. Each part needs 2 windows (one pair).
    """
    if not 0 <= holdout < 1:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
    if holdout == 0:
        return slice(None), slice(None)
    held = max(2, math.ceil(holdout * num_windows))
    if num_windows - held < 2:
        raise ConfigError(
            f"{num_windows} windows cannot be split into tuning and held-out parts of 2 windows "
            f"or more; use more windows (a longer trace or a smaller --interval) or --holdout 0"
        )
    return slice(None, num_windows - held), slice(num_windows - held, None)


def _optimize(optuna: Any, study: Any, objective: Any, trials: int) -> None:
    """Run trials until `trials` have finished in the whole study (other processes may add to
    it). Two processes on one SQLite study may both take the same enqueued trial (SQLite has no
    row locks): the second to finish it is told the trial is complete already, and goes on."""
    complete = optuna.trial.TrialState.COMPLETE
    for _ in range(trials + 1):  # each retry follows one trial another process finished first
        done = len(study.get_trials(deepcopy=False, states=(complete,)))
        if done >= trials:
            return
        try:
            study.optimize(objective, n_trials=trials - done, callbacks=[
                optuna.study.MaxTrialsCallback(trials, states=(complete,))])
            return
        except ValueError as error:
            if "Cannot tell a COMPLETE trial" not in str(error):
                raise


def _check_space(space: SearchSpace) -> None:
    if not space:
        raise ConfigError("the search space is empty: nothing to tune")
    for name, entry in space.items():
        if len(entry) != 3 or entry[2] not in _KINDS or not entry[0] < entry[1]:
            raise ConfigError(
                f"search space entry {name}={entry!r} must be (low, high, kind) with low < high "
                f"and kind in {', '.join(_KINDS)}"
            )
        if entry[2] == "log" and entry[0] <= 0:
            raise ConfigError(f"log-scaled parameter {name} needs low > 0, got {entry[0]}")


def _suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, (low, high, kind) in space.items():
        if kind == "int":
            params[name] = trial.suggest_int(name, int(low), int(high))
        else:
            params[name] = trial.suggest_float(name, float(low), float(high), log=kind == "log")
    return params


def _clipped(preset: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """The preset's values of the searched parameters, clipped into their ranges."""
    return {
        name: type(preset[name])(min(max(preset[name], space[name][0]), space[name][1]))
        for name in space if name in preset
    }


def _tape_policy_space() -> tuple[SearchSpace, dict[str, dict[str, Any]]]:
    from tape.policies.tape import PRESETS, SEARCH_SPACE

    return dict(SEARCH_SPACE), dict(PRESETS)


def tune(
    settings: Settings,
    *,
    trials: int,
    seed: int = 0,
    holdout: float = 0.25,
    policy: str = "tape",
    search_space: SearchSpace | None = None,
    presets: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[], None] | None = None,
    storage: str | None = None,
    resume: bool = False,
) -> TuneResult:
    """Search `policy`'s parameters for the best `combined_score` under `settings.version`.

    Args:
        settings: windows, layout, version and cost-model presets (as for `tape evolve`).
        trials: Optuna trials (each one protocol run on the tuning windows).
        seed: seed of the TPE sampler; the same inputs give the same trials.
        holdout: share of the windows kept out of tuning for the final comparison.
        policy: a registered policy name; "tape" reads its SEARCH_SPACE and PRESETS.
        search_space, presets: override what is searched and what is tried first.
        progress: called after every trial (of this process).
        storage: an SQLAlchemy URL of Optuna's RDB storage (None: in memory, lost on exit).
        resume: continue (or join) the study already in `storage`; without it, a storage that
            holds a study is an error.

    A KeyboardInterrupt (Ctrl-C) during the search stops it: the result is that of the
    finished trials, with `interrupted` set. With no finished trial it is raised again. One
    during the final comparison stops that: the result has the best parameters and no scores
    (`compared` False), with `interrupted` set.
    """
    from tape.evolution import require_extra

    optuna = require_extra("optuna", "tape tune")
    if trials < 1:
        raise ConfigError(f"trials must be at least 1, got {trials}")
    if search_space is None:
        if policy != "tape":
            raise ConfigError(f"give a search space to tune policy {policy!r}")
        search_space, default_presets = _tape_policy_space()
        presets = default_presets if presets is None else presets
    _check_space(search_space)
    tuning, evaluation = split_windows(len(settings.windows()), holdout)
    layout = settings.layout()
    model, cluster = settings.specs()

    def run(policy_name: str, part: slice, params: dict[str, Any] | None) -> ProgramScore:
        return score_policy(
            policy_name, settings.windows()[part], layout, version=settings.version,
            params=params, model=model, cluster=cluster, dispatch=settings.dispatch,
            steps_per_window=settings.window_steps()[part], timing_repeats=TIMING_REPEATS,
        )

    def objective(trial: Any) -> float:
        score = run(policy, tuning, _suggest(trial, search_space)).metrics["combined_score"]
        if progress is not None:
            progress()
        return score

    # ERROR: Optuna's "Trial N failed" warning (with a traceback) would repeat an error that is
    # raised anyway, or report a Ctrl-C that ends the search on purpose.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    interrupted = False
    complete = optuna.trial.TrialState.COMPLETE
    identity = {"policy": policy, "search_space": {name: list(entry) for name, entry in
                                                   search_space.items()},
                "holdout": holdout, "settings": settings.to_json()}
    try:
        study, new = _open_study(optuna, storage, seed, resume, identity)
        if new:
            for preset in (presets or {}).values():
                start = _clipped(preset, search_space)
                if start:
                    study.enqueue_trial(start)
        try:
            _optimize(optuna, study, objective, trials)
        except KeyboardInterrupt:
            interrupted = True
        except Exception as error:  # the storage's database failing (locked, gone), one line
            if not type(error).__module__.startswith("sqlalchemy"):
                raise
            reason = " ".join(str(error).split())[:300]
            raise ConfigError(f"the study storage {hide_password(str(storage))} failed: "
                              f"{reason}; the finished trials are kept there (--resume)") from None
    finally:
        optuna.logging.set_verbosity(verbosity)

    finished = [trial for trial in study.trials if trial.state == complete]
    if not finished:
        raise KeyboardInterrupt  # only an interrupted search ends with no finished trial
    result = TuneResult(
        policy=policy,
        best_params=dict(max(finished, key=lambda trial: trial.value).params),
        trials=[
            {"number": trial.number, "params": trial.params, "combined_score": trial.value}
            for trial in finished
        ],
        tuning_windows=len(settings.windows()[tuning]),
        evaluation_windows=len(settings.windows()[evaluation]),
        interrupted=interrupted,
    )
    try:
        scores = (run(policy, evaluation, result.best_params), run(policy, evaluation, None),
                  run("deepseek", evaluation, None))
    except KeyboardInterrupt:  # the finished trials are kept; the comparison is left out
        result.interrupted = True
    else:
        result.tuned, result.defaults, result.deepseek = scores
    return result


def hide_password(url: str) -> str:
    """`url` with the password of its `user:password@` part masked."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _open_study(optuna: Any, storage: str | None, seed: int, resume: bool,
                identity: dict[str, Any]) -> tuple[Any, bool]:
    """The study to run and whether it is new; ConfigError for a storage that cannot be
    opened, a study there without `resume`, or one made with another `identity`."""
    sampler = optuna.samplers.TPESampler(seed=seed)
    if storage is None:
        return optuna.create_study(direction="maximize", sampler=sampler), True
    # SQLite: wait for another process's write rather than fail at once
    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else None
    for attempt in range(5):  # processes that make one new storage at once may collide once
        try:
            study = optuna.create_study(
                study_name=STUDY_NAME, sampler=sampler, direction="maximize",
                storage=optuna.storages.RDBStorage(storage, engine_kwargs=engine),
                load_if_exists=True)
            break
        except Exception as error:  # noqa: BLE001 - SQLAlchemy and drivers raise many kinds
            racing = type(error).__name__ in ("IntegrityError", "OperationalError",
                                              "DuplicatedStudyError")
            if attempt == 4 or not racing:
                reason = " ".join(str(error).split())[:300] or type(error).__name__
                raise ConfigError(f"cannot open the study storage {hide_password(storage)}: "
                                  f"{reason}") from None
            time.sleep(0.5 + attempt)
    saved = study.user_attrs.get("identity")
    if saved is None:
        study.set_user_attr("identity", identity)
        return study, True
    if not resume:
        raise ConfigError(f"the study storage {hide_password(storage)} already holds a tape "
                          "tune study; pass --resume to continue it, or choose a new --out "
                          "(or --storage)")
    if saved != identity:
        changed = sorted(key for key in identity if saved.get(key) != identity[key])
        raise ConfigError(f"cannot resume: the study in {hide_password(storage)} tunes with "
                          f"another {', '.join(changed)}; resume with the same settings")
    return study, False


def tuned_program_text(policy: str, params: dict[str, Any], version: int | str) -> str:
    """A program file whose `rebalance_experts` is `policy` with `params`.

    Like the protocol, it passes the policy the placement it returned last and the loads of the
    windows it saw before (the last `HISTORY_WINDOWS`), so scoring the file in the sandbox
    reproduces what `tape tune` measured.
    """
    lines = [f"    {name!r}: {value!r}," for name, value in sorted(params.items())]
    return f'''"""The `{policy}` policy, parameters tuned by `tape tune` for TAPE version {version}.

Usable wherever a `rebalance_experts` program is expected (`tape evaluate`, `tape evolve
--initial`). Between calls it remembers the placement it returned and the loads it was given,
as the evaluation protocol gives a registered policy.
"""

from collections import deque

import numpy as np

from tape.api import rebalance_experts as place
from tape.arrays import to_numpy

POLICY = {policy!r}
PARAMS = {{
{chr(10).join(lines)}
}}
HISTORY_WINDOWS = 64
"""Earlier windows kept for the policy's forecast (older ones are dropped)."""

_seen = deque(maxlen=HISTORY_WINDOWS)
_previous_phy2log = None


def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    """(phy2log, log2phy, logcnt) for `weight` [L, E], as DeepSeek EPLB."""
    global _previous_phy2log
    history = np.stack(_seen) if _seen else None
    phy2log, log2phy, logcnt = place(
        weight, num_replicas, num_groups, num_nodes, num_gpus, policy=POLICY,
        previous_phy2log=_previous_phy2log, history=history, **PARAMS,
    )
    _seen.append(np.array(to_numpy(weight), dtype=np.float64))
    _previous_phy2log = to_numpy(phy2log)
    return phy2log, log2phy, logcnt
'''


def write_outputs(
    result: TuneResult, settings: Settings, out_dir: Path, *, trials: int, seed: int,
    holdout: float, replace: bool = False,
) -> dict[str, Path]:
    """Write best_params.json, tuned_program.py and tune_manifest.json into a new `out_dir`
    (all three or, if writing fails or is interrupted, none). With `replace`, `out_dir` may
    hold files already (the study's database, a resumed run's outputs, which are replaced).

    Raises:
        ConfigError: `out_dir` holds files (without `replace`), cannot be written, or the
            finished files could not be moved into it (the message says where they were kept).
    """
    out_dir = Path(out_dir)
    if not replace:
        require_new_folder(out_dir)
    try:
        with staged_folder(out_dir) as staging:
            written = _write_outputs(result, settings, staging, trials=trials, seed=seed,
                                     holdout=holdout)
    except CommitError as error:  # the files are kept in the staging folder it names
        raise ConfigError(str(error)) from None
    except OSError as error:
        raise ConfigError(f"cannot write to {out_dir}: {error.strerror or error}") from None
    return {key: out_dir / path.name for key, path in written.items()}


def _write_outputs(
    result: TuneResult, settings: Settings, out_dir: Path, *, trials: int, seed: int,
    holdout: float,
) -> dict[str, Path]:
    from importlib.metadata import version as package_version

    paths = {
        "params": out_dir / "best_params.json",
        "program": out_dir / "tuned_program.py",
        "manifest": out_dir / "tune_manifest.json",
    }
    write_json_atomic(paths["params"], {
        "policy": result.policy, "version": settings.version, "params": result.best_params,
    })
    paths["program"].write_text(
        tuned_program_text(result.policy, result.best_params, settings.version)
    )
    write_json_atomic(paths["manifest"], {
        "command": "tape tune",
        "tape_version": package_version("tape-moe"),
        "optuna_version": package_version("optuna"),
        "version": settings.version,
        "windows": settings.describe_source(),
        "settings": settings.to_json(),
        "trials": trials,
        "finished_trials": len(result.trials),
        "interrupted": result.interrupted,
        "compared": result.compared,
        "seed": seed,
        "holdout": holdout,
        "tuning_windows": result.tuning_windows,
        "evaluation_windows": result.evaluation_windows,
        "combined_score": {
            "tuned": result.tuned.metrics["combined_score"],
            "defaults": result.defaults.metrics["combined_score"],
            "deepseek": result.deepseek.metrics["combined_score"],
        } if result.compared else None,
        "scores": {
            "tuned": result.tuned.to_json(),
            "defaults": result.defaults.to_json(),
            "deepseek": result.deepseek.to_json(),
        } if result.compared else None,
        "trial_history": result.trials,
    })
    return paths
