"""`tape evaluate` and `tape evaluate-dir`: score user programs under the protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from tape import __version__
from tape.cli.common import (
    JsonOption,
    OverwriteOption,
    check_program_file,
    console,
    error_console,
    escape,
    handles_errors,
    output_folder,
    parse_out,
    prepare,
    progress_bar,
    sandbox_isolation,
    write_json_atomic,
)
from tape.cli.formatting import format_value
from tape.cli.options import with_settings
from tape.errors import ProgramError
from tape.files import to_json_text
from tape.protocol import ProgramScore, score_program
from tape.settings import Settings, Setup

__all__ = ["METRIC_SECTIONS", "register"]

# Rows of the metric table, in sections; other keys follow under "other". The combined score
# of the chosen version (combined_score) comes first in its version's section.
METRIC_SECTIONS: dict[str, tuple[str, ...]] = {
    "seed metrics": (
        "balancedness_score", "speed_score", "communication_score",
        "weight_copy_score", "avg_raw_time", "combined_score_v0", "combined_score_v2",
        "combined_score_v3", "combined_score_v4",
    ),
    "timeline": ("overall_balancedness", "compute_balancedness", "efficiency"),
    "realistic model": (
        "combined_score_realistic", "gpu_balancedness", "time_balancedness", "locality_score",
        "local_tokens", "nvlink_tokens", "ib_tokens", "ib_tokens_bound", "nvlink_bytes",
        "ib_bytes", "step_time_s", "compute_time_s", "comm_time_s", "balanced_compute_time_s",
    ),
    "migration per rebalance": (
        "changed_slots", "local_copies", "nvlink_copies", "ib_copies", "moved_experts",
        "migration_nvlink_bytes", "migration_ib_bytes", "migration_seconds",
    ),
}



def _metric_table(title: str, score: ProgramScore, version: int | str) -> Table:
    table = Table(title=title, show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    shown: set[str] = set()
    home = "realistic model" if version == "realistic" else "seed metrics"
    for section, names in METRIC_SECTIONS.items():
        if section == home:
            names = ("combined_score", *names)
        rows = [name for name in names if name in score.metrics]
        if rows:
            table.add_row(f"[bold]{section}[/]", "")
        for name in rows:
            table.add_row(f"  {name}", format_value(score.metrics[name]))
            shown.add(name)
    rest = sorted(set(score.metrics) - shown)
    if rest:
        table.add_row("[bold]other[/]", "")
        for name in rest:
            table.add_row(f"  {name}", format_value(score.metrics[name]))
    return table


# Columns of evaluate-dir's summary: (metric key, header stacked to fit 80 columns).
_SUMMARY_COLUMNS = (
    ("combined_score", "combined\nscore"),
    ("balancedness_score", "balanced-\nness\nscore"),
    ("overall_balancedness", "overall\nbalanced-\nness"),
    ("compute_balancedness", "compute\nbalanced-\nness"),
    ("efficiency", "effici-\nency"),
    ("gpu_balancedness", "GPU\nbalanced-\nness"),
)


def _summary_table(title: str, results: dict[str, dict[str, Any]]) -> Table:
    """One row a program; its error, if any, is printed below the table, not squeezed in."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    table.add_column("program", overflow="fold")
    for _, header in _SUMMARY_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    for name, result in results.items():
        values = (format_value(result[key]) if key in result else "-"
                  for key, _ in _SUMMARY_COLUMNS)
        table.add_row(escape(name) + (" [red](failed)[/]" if result["error"] else ""), *values)
    return table


def _score(program: Path, setup: Setup, settings: Settings, isolation: str,
           show_progress: bool) -> ProgramScore:
    """Score one program under `settings`' version and limits, in `isolation` (resolved)."""
    with progress_bar(program.name, setup.windows.shape[0] - 1, show_progress) as advance:
        return score_program(
            program, setup.windows, setup.layout, version=settings.version,
            timeout_s=settings.timeout_s, memory_mb=settings.memory_mb,
            budget_s=settings.budget_s, isolation=isolation, model=setup.model,
            cluster=setup.cluster, dispatch=setup.dispatch,
            steps_per_window=setup.window_steps, progress=advance,
        )


def register(app: typer.Typer) -> None:
    """Add `evaluate` and `evaluate-dir` to `app`."""

    @app.command()
    @handles_errors
    @with_settings()
    def evaluate(
        program: Annotated[Path, typer.Argument(help="Python file defining rebalance_experts.")],
        settings: Settings,
        as_json: JsonOption = False,
    ) -> None:
        """Score one program: rebalance on each window, score on the next, average the pairs."""
        check_program_file(program)
        version_value = settings.version
        isolation = sandbox_isolation(settings.isolation)
        setup = prepare(settings, show_progress=not as_json)
        score = _score(program, setup, settings, isolation, not as_json)
        if as_json:
            payload = {"program": str(program), "version": version_value,
                       "trace": setup.described, **score.to_json()}
            typer.echo(to_json_text(payload))
        else:
            console.print(f"[dim]{escape(setup.described)}[/]", highlight=False)
            console.print(_metric_table(escape(f"{program.name} (version {version_value})"), score,
                                        version_value))
            if score.error:
                error_console.print(f"[bold red]program failed:[/] {escape(score.error)}", highlight=False,
                                    soft_wrap=True)
        if score.error:
            raise typer.Exit(1)

    @app.command("evaluate-dir")
    @handles_errors
    @with_settings()
    def evaluate_dir(
        directory: Annotated[Path, typer.Argument(help="Folder of .py programs.")],
        settings: Settings,
        out: Annotated[
            Path | None, typer.Option("--out", parser=parse_out, metavar="<path>",
                                      help="Write one JSON result per program here.")
        ] = None,
        as_json: JsonOption = False,
        overwrite: OverwriteOption = False,
    ) -> None:
        """Score every .py program in a folder and print a summary table.

        Exits with code 1 when every program failed, as `tape evaluate` on a failing program.
        """
        if directory.is_file():
            raise ProgramError(f"{directory} is a file; score one program with "
                               f"`tape evaluate {directory}`")
        if not directory.is_dir():
            raise ProgramError(f"folder {directory} does not exist")
        programs = sorted(path for path in directory.glob("*.py") if path.is_file())
        if not programs:
            raise ProgramError(f"no .py programs in {directory}")
        version_value = settings.version
        isolation = sandbox_isolation(settings.isolation)
        with output_folder(out, overwrite) as staging:
            setup = prepare(settings, show_progress=not as_json)
            results: dict[str, dict[str, Any]] = {}
            for program in programs:
                score = _score(program, setup, settings, isolation, not as_json)
                results[program.name] = {"program": str(program), "version": version_value,
                                         "trace": setup.described, **score.to_json()}
                if staging is not None:
                    write_json_atomic(staging / f"{program.stem}_result.json",
                                      results[program.name])
            if staging is not None:
                write_json_atomic(staging / "manifest.json", {
                    "command": "evaluate-dir", "tape_version": __version__,
                    "directory": str(directory), "version": version_value,
                    "seed": settings.seed, **setup.manifest(), "programs": sorted(results),
                    "isolation": "bwrap" if isolation == "strict" else "partial",
                })
        if as_json:
            typer.echo(to_json_text(results))
        else:
            console.print(f"[dim]{escape(setup.described)}[/]", highlight=False)
            console.print(_summary_table(
                escape(f"programs in {directory} (version {version_value})"), results))
            for name, result in results.items():
                if result["error"]:
                    error_console.print(f"[bold red]{escape(name)} failed:[/] "
                                        f"{escape(result['error'])}", highlight=False,
                                        soft_wrap=True)
            if out is not None:  # a result per program and the manifest, as compare says
                console.print(f"wrote {len(results) + 1} files to {out}", markup=False,
                              highlight=False, soft_wrap=True)
        if all(result["error"] for result in results.values()):
            raise typer.Exit(1)  # nothing scored, as `tape evaluate` on a failing program
