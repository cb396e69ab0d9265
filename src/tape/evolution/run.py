"""`tape evolve`: an OpenEvolve run that evolves `rebalance_experts` under one scoring version.

`evolve(settings, out_dir=..., ...)` does what the seed did by hand:

1. resolves the OpenEvolve config (`tape.evolution.configs`): a shipped or the user's YAML,
   checked strictly, with the command line applied, the version's objective in the system
   message and the API key from the environment (never from a file);
2. raises OpenEvolve's evaluation timeout to the sandbox's worst case if it is lower, checks
   that each LLM endpoint can be connected to (`tape.evolution.endpoint`; `check_endpoints`
   False skips it) and that the user's initial program scores without failing;
3. writes the run folder: `initial_program.py`, `config.yaml` (the resolved config, key left
   out), `windows.npz` (the windows every candidate is scored on, computed once) and
   `tape_evolve.json` (the manifest);
4. runs OpenEvolve with `tape/evolution/evaluator.py` (sandboxed candidates), which writes
   `best/`, `checkpoints/` and `logs/`;
5. scores the best program with every TAPE metric, beside the `deepseek` policy, in
   `best/tape_scores.json`.

Resuming (`resume=checkpoint folder`) continues a run in its own folder with the same evaluation
settings (a mismatch is an error, so scores stay comparable); `overwrite` replaces an earlier run
in the folder instead. A used folder's error says which applies: `--resume` naming the newest
checkpoint that exists, or `--overwrite` when the earlier run wrote none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tape.errors import ConfigError, EvolutionError, ProgramError
from tape.evolution import prompts
from tape.evolution.configs import (
    DEFAULT_CONFIG,
    LLMChoice,
    ResolvedConfig,
    resolve_config,
    shipped_config,
)
from tape.files import CommitError, require_new_folder, staged_folder, write_json_atomic
from tape.protocol import ProgramScore, score_policy
from tape.sandbox import BUDGET_TIMEOUTS, STARTUP_SECONDS
from tape.settings import ENVIRONMENT, Settings

__all__ = ["MANIFEST", "RUN_ENTRIES", "EvolveResult", "evolve", "newest_checkpoint"]

MANIFEST = "tape_evolve.json"
"""The run folder's manifest."""


@dataclass
class EvolveResult:
    """What an evolution run produced.

    Attributes:
        out_dir: the run folder.
        best_program: `best/best_program.py` in it.
        best: the best program's TAPE scores (every metric).
        deepseek: the `deepseek` policy's scores on the same windows, for comparison.
        newest_checkpoint: the checkpoint `--resume` would continue from (None: none written).
        interrupted: Ctrl-C (or SIGTERM) stopped the run before its last iteration; the best
            program is the best found so far.
    """

    out_dir: Path
    best_program: Path
    best: ProgramScore
    deepseek: ProgramScore
    newest_checkpoint: Path | None = None
    interrupted: bool = False


def _evaluation_bound(settings: Settings) -> float:
    """Seconds one evaluation can take at most: start-up, then the import and every call at
    their limit, or the whole budget when that is less."""
    pairs = settings.windows().shape[0] - 1
    budget = settings.budget_s or BUDGET_TIMEOUTS * settings.timeout_s
    return STARTUP_SECONDS + min((pairs + 1) * settings.timeout_s, budget) + 30.0


# -- the run folder --------------------------------------------------------------------------


RUN_ENTRIES = ("best", "checkpoints", "logs", "initial_program.py", "config.yaml",
               "windows.npz", MANIFEST)
"""What a run writes into its folder (OpenEvolve's `evolution_trace*` files too, when its config
turns them on); `overwrite` removes these and nothing else."""


def newest_checkpoint(out_dir: Path) -> Path | None:
    """The run's checkpoint with the highest iteration (`checkpoints/checkpoint_N` holding
    OpenEvolve's metadata.json), or None when it has none."""
    found = [
        (int(folder.name.removeprefix("checkpoint_")), folder)
        for folder in Path(out_dir).glob("checkpoints/checkpoint_*")
        if folder.name.removeprefix("checkpoint_").isdigit() and (folder / "metadata.json").is_file()
    ]
    return max(found)[1] if found else None


def _run_entries(out_dir: Path) -> list[Path]:
    """The entries of an earlier run in `out_dir`."""
    named = [out_dir / name for name in RUN_ENTRIES]
    return [path for path in named if path.exists()] + sorted(out_dir.glob("evolution_trace*"))


def _check_folder(out_dir: Path, resume: Path | None, overwrite: bool) -> None:
    """ConfigError unless `out_dir` can hold a new run (with `overwrite`: unless it is empty or
    holds an earlier run), or `resume` is a checkpoint of its run."""
    if resume is not None:
        if overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces it; give one")
        if not (resume / "metadata.json").is_file():
            newest = newest_checkpoint(resume.parent.parent)
            hint = f"; the newest checkpoint of that run is {newest}" if newest else ""
            raise ConfigError(f"{resume} is not an OpenEvolve checkpoint (no metadata.json){hint}")
        _read_json(resume / "metadata.json", "checkpoint metadata")  # OpenEvolve: a traceback
        if resume.resolve().parent.parent != out_dir.resolve():
            raise ConfigError(
                f"a run resumes in its own folder: {resume} belongs to "
                f"{resume.resolve().parent.parent}, not {out_dir}"
            )
        return
    earlier_run = (out_dir / MANIFEST).is_file()
    if overwrite and not out_dir.is_file():  # a file: require_new_folder says so
        if out_dir.is_dir() and any(out_dir.iterdir()) and not earlier_run:
            raise ConfigError(
                f"--overwrite replaces an earlier tape evolve run, but {out_dir} holds none (no "
                f"{MANIFEST}); choose another --out"
            )
        return
    newest = newest_checkpoint(out_dir)
    if newest is not None:
        hint = (f"continue its run with --resume {newest}, replace the run with --overwrite, or "
                "choose another --out")
    elif earlier_run:
        hint = ("its run wrote no checkpoint, so there is nothing to resume; replace the run "
                "with --overwrite, remove the folder, or choose another --out")
    else:
        hint = "choose another --out"
    require_new_folder(out_dir, hint)


def _what_is_kept(out_dir: Path) -> str:
    """Where a failed run's logs are and what to do next: resume from its newest checkpoint if
    it wrote one, else start again."""
    logs = out_dir / "logs"
    where = f"the run's logs are in {logs}" if logs.is_dir() else f"the run folder is {out_dir}"
    newest = newest_checkpoint(out_dir)
    if newest is not None:
        return f"{where}; --resume {newest} continues it"
    return f"{where}; it wrote no checkpoint: run again with --overwrite or another --out"


def _initial_source(initial_program: Path | None) -> str:
    """The program the run starts from: the user's file, or DeepSeek's policy in numpy."""
    if initial_program is None:
        return prompts.initial_program_text()
    try:
        return Path(initial_program).read_text()
    except OSError as error:
        raise ConfigError(
            f"initial program {initial_program} cannot be read: {error.strerror or error}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"initial program {initial_program} is not UTF-8 text") from None


def _check_initial_program(path: Path, settings: Settings) -> None:
    """ProgramError naming the failure if the user's initial program scores 0 by failing (it
    raises, times out, returns a bad placement): evolution would start from nothing."""
    from tape.evolution import evaluator

    score = evaluator.score_candidate(path, settings)
    if score.error is not None:
        raise ProgramError(
            f"initial program {path} fails, so evolution would start from a score of 0: "
            f"{score.error}"
        )


def _check_endpoints(resolved: ResolvedConfig, warn: Callable[[str], None]) -> None:
    """ConfigError if no connection can be made to an LLM endpoint of the run; `warn` if one
    answers slowly or with an error status (401/403: the key; 404: perhaps a missing /v1)."""
    from tape.evolution.endpoint import check_endpoint

    for endpoint in resolved.endpoints:
        warning = check_endpoint(endpoint.api_base, endpoint.api_key,
                                 key_variable=endpoint.key_variable)
        if warning is not None:
            warn(warning)


def _set_aside(out_dir: Path) -> Path | None:
    """Move an earlier run's entries (`RUN_ENTRIES`) into a hidden folder in `out_dir` (renames
    within one folder); return it, or None when there is no earlier run."""
    entries = _run_entries(out_dir) if out_dir.is_dir() else []
    if not entries:
        return None
    aside = out_dir / f".tape-evolve-replaced-{uuid.uuid4().hex[:12]}"
    aside.mkdir()
    try:
        for entry in entries:
            os.rename(entry, aside / entry.name)
    except BaseException:
        _put_back(aside, out_dir)
        raise
    return aside


def _put_back(aside: Path, out_dir: Path) -> None:
    """Undo `_set_aside`: the earlier run's entries back in `out_dir`, replacing new files."""
    for entry in aside.iterdir():
        os.replace(entry, out_dir / entry.name)
    aside.rmdir()


def _write_setup(out_dir: Path, settings: Settings, source: str,
                 saved_config: dict[str, Any], manifest: dict[str, Any], *,
                 replace_earlier_run: bool) -> None:
    """Write `initial_program.py`, `windows.npz`, `config.yaml` and the manifest into `out_dir`,
    all four or none (`staged_folder`). With `replace_earlier_run`, an earlier run's entries
    (`RUN_ENTRIES`) are set aside first and removed once the new files are in place; if
    writing fails or is interrupted they are put back, so the earlier run is never lost.

    Raises:
        ConfigError: `out_dir` cannot be written (permissions, a full disk).
        EvolutionError: the written files could not be moved into `out_dir`; the message says
            where they were kept.
    """
    try:
        aside = _set_aside(out_dir) if replace_earlier_run else None
    except OSError as error:
        raise ConfigError(f"cannot replace the earlier run in {out_dir}: "
                          f"{error.strerror or error}") from None
    try:
        with staged_folder(out_dir) as staging:
            (staging / "initial_program.py").write_text(source)
            settings.save_windows(staging / "windows.npz")
            (staging / "config.yaml").write_text(yaml.safe_dump(saved_config, sort_keys=False))
            write_json_atomic(staging / MANIFEST, manifest)
    except BaseException as error:
        if aside is not None:
            _put_back(aside, out_dir)
        if isinstance(error, CommitError):
            raise EvolutionError(str(error)) from None
        if isinstance(error, OSError):
            raise ConfigError(f"cannot write the run folder {out_dir}: "
                              f"{error.strerror or error}") from None
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; ConfigError naming `what` if it cannot be read as one."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"cannot resume: the {what} {path} is unreadable "
                          f"({getattr(error, 'strerror', None) or error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"cannot resume: the {what} {path} is not a JSON object")
    return data


def _check_resumed_settings(out_dir: Path, settings: Settings) -> None:
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise ConfigError(
            f"cannot resume in {out_dir}: it has no {MANIFEST} (not a tape evolve run)"
        )
    saved = _read_json(manifest, "run manifest").get("settings")
    if not isinstance(saved, dict):
        raise ConfigError(f"cannot resume: the run manifest {manifest} has no settings")
    current = settings.to_json()
    differences = [
        f"{name}: run {saved.get(name)!r}, now {current[name]!r}"
        for name in current if saved.get(name) != current[name]
    ]
    if differences:
        raise ConfigError(
            "resume with the run's evaluation settings (scores must stay comparable); "
            + "; ".join(differences)
        )


@contextmanager
def _evaluation_environment(settings: Settings) -> Iterator[None]:
    """TAPE_* variables for OpenEvolve's workers during the run; the old ones restored after."""
    saved = {name: os.environ.get(name) for name in ENVIRONMENT.values()}
    for name in ENVIRONMENT.values():
        os.environ.pop(name, None)
    os.environ.update(settings.to_environment())
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _openevolve_side_effects_undone() -> Iterator[None]:
    """OpenEvolve adds root log handlers and SIGINT/SIGTERM handlers; remove them afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    signal_handlers = {number: signal.getsignal(number) for number in (signal.SIGINT,
                                                                       signal.SIGTERM)}
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
        for number, handler in signal_handlers.items():
            signal.signal(number, handler)


def evolve(
    settings: Settings,
    *,
    out_dir: Path,
    iterations: int | None = None,
    config_path: Path | None = None,
    llm: LLMChoice | None = None,
    full_rewrite: bool = False,
    resume: Path | None = None,
    initial_program: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overwrite: bool = False,
    check_endpoints: bool = True,
    warn: Callable[[str], None] | None = None,
) -> EvolveResult:
    """Run OpenEvolve on `rebalance_experts` under `settings` (see the module doc).

    Args:
        settings: what candidates are scored on (version, trace, layout, limits).
        out_dir: the run folder (new or empty; when resuming, the checkpoint's run folder).
        iterations: evolution iterations (None: the config's `max_iterations`).
        config_path: an OpenEvolve YAML (None: the shipped `gemini`, or when resuming the run's
            own `config.yaml`).
        llm: endpoint, models and key variable from the command line (None: the config's).
        full_rewrite: ask the LLM for whole programs instead of SEARCH/REPLACE diffs.
        resume: a checkpoint folder (`<run>/checkpoints/checkpoint_N`) to continue from.
        initial_program: the program to start from (None: DeepSeek's policy in numpy).
        environ: where the API key is looked up (None: `os.environ`).
        overwrite: `out_dir` may hold an earlier run; its files (`RUN_ENTRIES`) are replaced
            once every check has passed and the new run's files are written (if writing
            fails, the earlier run stays as it was); other files are kept.
        check_endpoints: first check that each LLM endpoint can be connected to
            (`tape.evolution.endpoint`); False skips that request.
        warn: called with each one-line warning (None: this module's logger).

    Raises:
        ConfigError: a bad config or presets file, no API key, an unreadable initial program, a
            used output folder, mismatched resume settings, an LLM endpoint that cannot be
            reached (all before the run folder is made).
        ProgramError: the initial program fails when scored (also before).
        TraceError: a trace that cannot be read or does not fit the layout (also before).
        EvolutionError: no iteration produced a candidate program (the LLM never answered usably).
        KeyboardInterrupt: a second Ctrl-C stopped the run at once (the message says what is
            kept); after one, the run ends as usual with `interrupted` set.
    """
    from tape.evolution import require_extra

    require_extra("openevolve", "tape evolve")
    from openevolve import OpenEvolve
    from openevolve import controller as openevolve_controller

    from tape.evolution import evaluator

    environ = os.environ if environ is None else environ
    warn = warn or logging.getLogger(__name__).warning
    llm = llm or LLMChoice()
    stray = {name: value for name, value in os.environ.items()
             if name.startswith("TAPE_") and name not in ENVIRONMENT.values()}
    Settings.from_environment(stray)  # a stray TAPE_* variable would fail every worker
    out_dir = Path(out_dir)
    resume = Path(resume) if resume is not None else None
    # Everything the user gave is checked before the run folder is made, so a mistake leaves none.
    _check_folder(out_dir, resume, overwrite)
    if resume is not None:
        _check_resumed_settings(out_dir, settings)
    if config_path is None:
        resumed_config = out_dir / "config.yaml"
        config_path = resumed_config if resume and resumed_config.is_file() else shipped_config(
            DEFAULT_CONFIG
        )
    resolved = resolve_config(
        Path(config_path), version=settings.version, iterations=iterations, llm=llm,
        full_rewrite=full_rewrite, environ=environ,
    )
    config, saved_config = resolved.config, resolved.saved
    windows = settings.windows()
    model, cluster = settings.specs()
    source = _initial_source(initial_program) if resume is None else None
    bound = _evaluation_bound(settings)
    if config.evaluator.timeout < bound:
        warn(f"raising evaluator.timeout from {config.evaluator.timeout} to {bound:.0f} s: "
             "OpenEvolve must not abandon an evaluation that the sandbox is still bounding")
        config.evaluator.timeout = int(np.ceil(bound))
        saved_config.setdefault("evaluator", {})["timeout"] = config.evaluator.timeout

    if check_endpoints:  # a wrong --api-base stops here, not after every iteration failed
        _check_endpoints(resolved, warn)
    if source is not None and initial_program is not None:
        _check_initial_program(Path(initial_program), settings)

    program_path = out_dir / "initial_program.py"
    windows_path = out_dir / "windows.npz"
    if source is not None:
        _write_setup(out_dir, settings, source, saved_config,
                     _manifest(settings, config_path, resolved), replace_earlier_run=overwrite)
    worker_settings = dataclasses.replace(settings, trace=None, windows_file=windows_path)

    # OpenEvolve >= 0.4.1 raises this when every iteration failed before producing a program.
    no_candidate = getattr(openevolve_controller, "EvolutionFailedError", ())
    with _evaluation_environment(worker_settings), _openevolve_side_effects_undone():
        controller = OpenEvolve(
            initial_program_path=str(program_path), evaluation_file=evaluator.__file__,
            config=config, output_dir=str(out_dir),
        )
        try:
            asyncio.run(controller.run(
                iterations=iterations, checkpoint_path=str(resume) if resume else None))
        except no_candidate as error:
            raise EvolutionError(
                f"the LLM gave no usable candidate program: {str(error).rstrip('.')}. Check "
                f"that --api-base and --model reach a model that answers in OpenEvolve's "
                f"format; {_what_is_kept(out_dir)}"
            ) from None
        except SystemExit:  # OpenEvolve's answer to a second Ctrl-C: sys.exit(0) at once
            if not _stopped_by_signal():
                raise
            raise KeyboardInterrupt(
                f"interrupted twice: the run stopped at once; {_what_is_kept(out_dir)}"
            ) from None
        interrupted = _stopped_by_signal()

    best_program = out_dir / "best" / "best_program.py"
    if not best_program.is_file():
        raise ConfigError(f"OpenEvolve wrote no best program to {best_program}; see {out_dir}/logs")
    best = evaluator.score_candidate(best_program, worker_settings)
    deepseek = score_policy(
        "deepseek", windows, settings.layout(), version=settings.version, model=model,
        cluster=cluster, dispatch=settings.dispatch, steps_per_window=settings.window_steps(),
    )
    write_json_atomic(
        out_dir / "best" / "tape_scores.json",
        {"version": settings.version, "program": best.to_json(),
         "deepseek": deepseek.to_json()},
    )
    return EvolveResult(out_dir, best_program, best, deepseek, newest_checkpoint(out_dir),
                        interrupted)


def _stopped_by_signal() -> bool:
    """Whether OpenEvolve's SIGINT/SIGTERM handler ran during the run: it stops the run after
    the iterations under way, and leaves `force_exit_handler` for a second Ctrl-C."""
    return getattr(signal.getsignal(signal.SIGINT), "__name__", None) == "force_exit_handler"


def _manifest(settings: Settings, config_path: Path, resolved: ResolvedConfig
              ) -> dict[str, Any]:
    from importlib.metadata import version as package_version

    return {
        "command": "tape evolve",
        "tape_version": package_version("tape-moe"),
        "openevolve_version": package_version("openevolve"),
        "version": settings.version,
        "windows": settings.describe_source(),
        "settings": settings.to_json(),
        "config": str(config_path),
        "llm": {
            "api_base": resolved.config.llm.api_base,
            "models": [model.name for model in resolved.config.llm.models],
            "api_key_variable": resolved.key_variable,
        },
        "random_seed": resolved.config.random_seed,
    }
