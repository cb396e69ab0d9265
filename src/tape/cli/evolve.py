"""`tape evolve` (OpenEvolve with an LLM) and `tape tune` (Optuna, no LLM): search for policies.

Both score candidates exactly as `tape evaluate` does, with the same `tape.settings.Settings`
and the same shared options (`tape.cli.options`): `--model` is the MoE model and `--config` the
presets file in every command. The LLM side of `tape evolve` has its own names: `--llm` for the
model(s), `--evolve-config` for OpenEvolve's config.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from tape.cli.common import (
    check_out_writable,
    console,
    error_console,
    escape,
    handles_errors,
    parse_out,
    prepare,
    progress_bar,
    sandbox_isolation,
)
from tape.cli.options import with_settings
from tape.cli.out_lock import out_lock
from tape.errors import ConfigError, counted
from tape.protocol import ProgramScore
from tape.settings import Settings

__all__ = ["register"]


def _out_option(command: str) -> Any:
    resumed = "; with --resume, the checkpoint's run folder" if command == "evolve" else ""
    return typer.Option("--out", parser=parse_out, metavar="<path>", help=f"Output folder (new or empty); default: "
                        f"tape-out/{command}-v4 for --scoring 4, tape-out/{command}-realistic for "
                        f"realistic{resumed}.")


def _checked(settings: Settings) -> Settings:
    """`settings`, its windows read (cached) with a spinner: a bad trace is an error before any
    folder is made."""
    prepare(settings)
    return settings


def _default_out(command: str, version: int | str) -> Path:
    suffix = "realistic" if version == "realistic" else f"v{version}"
    return Path("tape-out") / f"{command}-{suffix}"


def _warn(message: str) -> None:
    """A one-line warning on stderr, as the CLI's other warnings."""
    error_console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False,
                        soft_wrap=True)


def _comparison_table(title: str, scores: dict[str, ProgramScore], metrics: tuple[str, ...]
                      ) -> Table:
    """Metrics down, programs across: readable at 80 columns whatever the version's metrics."""
    from tape.cli.formatting import format_value

    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    table.add_column("metric")
    for name in scores:
        table.add_column(name, justify="right", no_wrap=True)
    for metric in ("combined_score", *metrics):
        cells = []
        for score in scores.values():
            if score.error is not None:  # a failed program scores 0 and measures nothing
                cells.append("0" if metric == "combined_score" else "-")
            else:  # a metric a run could not measure (migration, one window pair) shows "-"
                cells.append(format_value(score.metrics[metric]) if metric in score.metrics
                             else "-")
        table.add_row(metric, *cells)
    return table


def register(app: typer.Typer) -> None:
    """Add `evolve` and `tune` to `app`."""

    @app.command()
    @handles_errors
    @with_settings()
    def evolve(
        settings: Settings,
        iterations: Annotated[
            int | None, typer.Option("--iterations", min=1, help="Evolution iterations "
                                     "(default: the config's max_iterations).")
        ] = None,
        api_base: Annotated[
            str | None, typer.Option("--api-base", help="OpenAI-compatible endpoint, e.g. "
                                     "http://localhost:8000/v1 (vLLM) or :11434/v1 (ollama).")
        ] = None,
        llm: Annotated[
            list[str] | None, typer.Option("--llm", metavar="<name>", help="LLM model name; "
                                           "repeat for an ensemble (equal weights).")
        ] = None,
        api_key_env: Annotated[
            str | None, typer.Option("--api-key-env", help="Environment variable holding the "
                                     "API key (default OPENAI_API_KEY).")
        ] = None,
        evolve_config: Annotated[
            str | None, typer.Option("--evolve-config", help="OpenEvolve YAML, or a shipped "
                                     "config's name: gemini (default), local.")
        ] = None,
        full_rewrite: Annotated[
            bool, typer.Option("--full-rewrite", help="Ask for whole programs, not diffs.")
        ] = False,
        resume: Annotated[
            Path | None, typer.Option("--resume", help="Checkpoint folder to continue from: "
                                      "checkpoint_N in the run's checkpoints/ folder.")
        ] = None,
        initial: Annotated[
            Path | None, typer.Option("--initial", help="Program to start from (default: "
                                      "DeepSeek EPLB's policy in numpy).")
        ] = None,
        out: Annotated[Path | None, _out_option("evolve")] = None,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace an earlier tape evolve run in --out "
                               "(its best/, checkpoints/, logs/ and TAPE's files; other files "
                               "are kept).")
        ] = False,
        no_endpoint_check: Annotated[
            bool, typer.Option("--no-endpoint-check", help="Skip the check, made before the "
                               "run, that each LLM endpoint can be connected to (one GET of "
                               "its /models).")
        ] = False,
    ) -> None:
        """Evolve rebalance_experts with OpenEvolve and an LLM; score with TAPE's sandbox."""
        from tape.evolution import configs, require_extra, run

        require_extra("openevolve", "tape evolve")  # before the trace is read
        if out is None:
            out = resume.resolve().parent.parent if resume else _default_out(
                "evolve", settings.version)
        # A used folder: run.evolve's hint (--resume with its newest checkpoint, or --overwrite).
        # A resumed run's folder exists already, and run.evolve checks the checkpoint first.
        if resume is None:
            check_out_writable(out, must_be_empty=False)
        with out_lock(out):
            settings = _checked(dataclasses.replace(
                settings, isolation=sandbox_isolation(settings.isolation)))
            if initial is not None and not initial.is_file():
                problem = "is a folder, not a Python file" if initial.is_dir() else "does not exist"
                raise ConfigError(f"initial program {initial} {problem}")
            config_path = (configs.find_config(evolve_config) if evolve_config is not None
                           else None)
            result = run.evolve(
                settings, out_dir=out, iterations=iterations, config_path=config_path,
                llm=configs.LLMChoice(api_base=api_base, models=tuple(llm or ()),
                                  api_key_env=api_key_env),
                full_rewrite=full_rewrite, resume=resume, initial_program=initial,
                overwrite=overwrite, check_endpoints=not no_endpoint_check, warn=_warn,
            )
            from tape.evolution.prompts import version_metrics

            console.print(_comparison_table(
                f"best evolved program vs deepseek (version {settings.version})",
                {"best_program.py": result.best, "deepseek": result.deepseek},
                version_metrics(settings.version),
            ))
            # soft_wrap: a path is never broken over two lines (it is meant to be copied)
            console.print(f"best program: {result.best_program}", markup=False, highlight=False,
                          soft_wrap=True)
            held = [f"{name}/" for name in ("best", "checkpoints", "logs")
                    if (result.out_dir / name).is_dir()]
            console.print(f"run folder:   {result.out_dir} ({', '.join(held)}, "
                          "best/tape_scores.json)", markup=False, highlight=False, soft_wrap=True)
            if result.newest_checkpoint is not None:
                console.print(f"to continue:  --resume {result.newest_checkpoint}", markup=False,
                              highlight=False, soft_wrap=True)
            if result.best.error:
                error_console.print(f"[bold red]best program failed:[/] {escape(result.best.error)}",
                                    highlight=False, soft_wrap=True)
            if result.interrupted:  # after the summary: what the finished iterations found
                error_console.print(
                    "[bold yellow]interrupted[/]: the run stopped before its last iteration; the best "
                    "program is the best of the iterations that finished", highlight=False,
                    soft_wrap=True)
                raise typer.Exit(130)

    @app.command()
    @handles_errors
    @with_settings(sandbox=False)
    def tune(
        settings: Settings,
        trials: Annotated[int, typer.Option("--trials", min=1, help="Optuna trials.")] = 50,
        holdout: Annotated[
            float, typer.Option("--holdout", min=0.0, max=0.9, help="Share of the last windows "
                                "kept out of tuning, for an unbiased comparison (0: none).")
        ] = 0.25,
        sampler_seed: Annotated[
            int, typer.Option("--sampler-seed", min=0, max=2**32 - 1,
                             help="Seed of Optuna's TPE sampler.")
        ] = 0,
        out: Annotated[Path | None, _out_option("tune")] = None,
        storage: Annotated[
            str | None, typer.Option("--storage", metavar="<url>", help="Optuna storage of the "
                                     "study, an SQLAlchemy URL (postgresql://..., for several "
                                     "machines tuning one study with --resume); default: "
                                     "sqlite in --out/study.db.")
        ] = None,
        resume: Annotated[
            bool, typer.Option("--resume", help="Continue the study in --out (or join the one "
                               "in --storage) until --trials trials have finished in all.")
        ] = False,
    ) -> None:
        """Tune the tape policy's parameters with Optuna (no LLM); compare with deepseek."""
        from tape.evolution import require_extra

        require_extra("optuna", "tape tune")  # before the trace is read
        out = out if out is not None else _default_out("tune", settings.version)
        if storage is not None and not storage.strip():
            raise ConfigError("--storage is an empty URL; give an SQLAlchemy URL such as "
                              "postgresql://user@host/db, or leave it out")
        # before the trials, not after them; a used folder only to resume its study
        check_out_writable(out, must_be_empty=not resume, hint=", or pass --resume to continue "
                           "the study it holds" if storage is None else "")
        with out_lock(out):
            settings = _checked(settings)
            _tune_into(out, settings, trials=trials, seed=sampler_seed, holdout=holdout,
                       storage=storage, resume=resume)


def _tune_into(out: Path, settings: Any, *, trials: int, seed: int, holdout: float,
               storage: str | None, resume: bool) -> None:
    """Run the study (in `storage`, else in --out's study.db), write the results into `out`,
    print them. A new --out made for a run that finished no trial is removed again."""
    from tape.evolution import tune as tuning

    study_file = out / tuning.STUDY_FILE
    if storage is None and resume and not study_file.is_file():
        raise ConfigError(f"nothing to resume: {out} holds no study ({tuning.STUDY_FILE}); "
                          "leave out --resume to start one")
    made = not out.exists()
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{study_file.resolve()}"
    finished: list[int] = []  # one entry a trial this process finished
    try:
        with progress_bar("tuning", trials) as advance:
            result = tuning.tune(settings, trials=trials, seed=seed, holdout=holdout,
                                 progress=lambda: (finished.append(1), advance()),
                                 storage=url, resume=resume)
        paths = tuning.write_outputs(result, settings, out, trials=trials, seed=seed,
                                     holdout=holdout, replace=True)
    except KeyboardInterrupt:  # no finished trial, or Ctrl-C while the files are written
        if made and not finished:
            shutil.rmtree(out, ignore_errors=True)
        kept = (f"; {tuning.hide_password(url)} keeps what finished "
                f"({counted(len(finished), 'trial')}): continue with --resume") if finished else ""
        when = "before any trial finished" if not finished else "before the results were written"
        error_console.print(f"interrupted {when}; nothing written{kept}", highlight=False,
                            soft_wrap=True, markup=False)
        raise typer.Exit(130) from None
    except BaseException:
        if made and not finished:
            shutil.rmtree(out, ignore_errors=True)
        raise
    _print_tune_result(result, settings.version, holdout, paths, trials)
    if result.interrupted:
        raise typer.Exit(130)


def _print_tune_result(result: Any, version: int | str, holdout: float, paths: dict[str, Path],
                       trials: int) -> None:
    """The comparison table, the gain over deepseek, a warning when the tuned parameters score
    below the defaults, the files written, and a line if the search or the comparison was
    interrupted."""
    if result.compared:
        _print_comparison(result, version, holdout)
    for name, path in paths.items():
        console.print(f"{name}: {path}", markup=False, highlight=False, soft_wrap=True)
    if not result.compared:
        names = ", ".join(path.name for path in paths.values())
        error_console.print(
            f"[bold yellow]interrupted[/] during the final comparison: {escape(names)} hold the "
            f"best of the {len(result.trials)} finished trials (of {trials}), not compared with "
            "the defaults or deepseek (tune_manifest.json: \"compared\": false)",
            highlight=False, soft_wrap=True,
        )
    elif result.interrupted:
        error_console.print(
            f"[bold yellow]interrupted[/] after {len(result.trials)} of {trials} trials: the "
            "results are those of the finished trials (tune_manifest.json: \"interrupted\": true)",
            highlight=False, soft_wrap=True,
        )


def _print_comparison(result: Any, version: int | str, holdout: float) -> None:
    """The comparison table, the gain over deepseek, and a warning when the tuned parameters
    score below the defaults."""
    from tape.evolution.prompts import version_metrics

    windows = result.evaluation_windows
    console.print(_comparison_table(
        f"tape tune, version {version}: "
        + (f"{windows} held-out windows" if holdout else f"all {windows} windows"),
        {"tape tuned": result.tuned, "tape defaults": result.defaults,
         "deepseek": result.deepseek},
        version_metrics(version),
    ))
    tuned = result.tuned.metrics["combined_score"]
    gain = tuned - result.deepseek.metrics["combined_score"]
    console.print(f"tuned - deepseek combined_score: {gain:+.4f}", highlight=False)
    if result.tuned_below_defaults:
        defaults = result.defaults.metrics["combined_score"]
        error_console.print(
            f"[bold yellow]warning:[/] on the {windows} {'held-out ' if holdout else ''}windows "
            f"the tuned parameters score below the tape policy's defaults ({tuned:.4f} < "
            f"{defaults:.4f}); they are written all the same. More --trials or a longer trace "
            "may help",
            highlight=False, soft_wrap=True,
        )
