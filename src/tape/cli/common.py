"""Helpers shared by the CLI's commands: output, errors, progress; the shared options live in
`tape.cli.options`."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tape.cli.out_lock import out_lock
from tape.errors import (
    ConfigError,
    LayoutError,
    ProgramError,
    TapeError,
)
from tape.files import CommitError, holds_files, probe_writable, staged_folder, write_json_atomic
from tape.policies import PolicyError
from tape.settings import Settings, Setup, flag_names

__all__ = [
    "JsonOption",
    "OverwriteOption",
    "Setup",
    "check_out_folder",
    "check_out_writable",
    "check_program_file",
    "console",
    "error_console",
    "escape",
    "flag_names",
    "handles_errors",
    "loading",
    "output_folder",
    "parse_out",
    "prepare",
    "progress_bar",
    "sandbox_isolation",
    "write_json_atomic",
]

console = Console()
error_console = Console(stderr=True)

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Write into an --out folder that already holds files, "
                       "replacing files of the same names.")
]


def parse_out(text: str) -> Path:
    """--out's folder; an empty path (say `--out "$OUT"` with OUT unset) is a usage error:
    taken as ".", it would write into the current folder under --overwrite."""
    if not text.strip():
        raise typer.BadParameter("an empty path; give a folder")
    return Path(text)


def check_out_folder(out: Path | None, *, must_be_empty: bool = True,
                     overwrite_flag: bool = False, hint: str = "") -> None:
    """ConfigError if --out is a file, or (with `must_be_empty`) a folder that already holds
    files: a run never mixes its results with another's unless asked to (`overwrite_flag`: the
    command has --overwrite, and the message names it; `hint`, another way, added to the
    message). Checked before any work is done."""
    if out is None:
        return
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--out {out} lies under {parent}, which is a file; give a folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (new or empty)")
    if must_be_empty and holds_files(out):
        if overwrite_flag:
            hint = ", or pass --overwrite to replace its files"
        raise ConfigError(f"--out {out} already holds files; choose a new or empty folder{hint}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the line to print (what happened to the output)."""


@contextmanager
def output_folder(out: Path | None, overwrite: bool) -> Iterator[Path | None]:
    """Where a command with --out and --overwrite writes its results: a staging folder whose
    files appear in --out all together when the block succeeds, or not at all
    (`tape.files.staged_folder`); None without --out. Before the block, --out is checked
    (`check_out_folder`: a used folder only with --overwrite), locked (`out_lock`: one run at a
    time, staging left by killed runs removed) and written to, so that a path that cannot be
    written fails before any work, with a one-line error. Ctrl-C in the block
    leaves --out as it was and says so."""
    check_out_folder(out, must_be_empty=not overwrite, overwrite_flag=True)
    if out is None:
        yield None
        return
    stack = ExitStack()
    stack.enter_context(out_lock(out))  # another run writing into --out: a one-line error
    try:
        staging = stack.enter_context(staged_folder(out))
    except OSError as error:
        stack.close()
        raise _unwritable(out, error) from None
    try:
        with stack:
            try:
                yield staging
            except KeyboardInterrupt:
                raise Interrupted(f"interrupted; nothing written to {out}") from None
    except CommitError as error:
        raise ConfigError(str(error)) from None


def check_out_writable(out: Path | None, *, must_be_empty: bool = True,
                       overwrite_flag: bool = False, hint: str = "") -> None:
    """`check_out_folder`, then ConfigError unless results can be staged for --out
    (`tape.files.probe_writable`): for commands that write --out only after long work."""
    check_out_folder(out, must_be_empty=must_be_empty, overwrite_flag=overwrite_flag, hint=hint)
    if out is None:
        return
    try:
        probe_writable(out)
    except OSError as error:
        raise _unwritable(out, error) from None


def _unwritable(out: Path, error: OSError) -> ConfigError:
    return ConfigError(f"cannot write to --out {out}: {error.strerror or error}")


def prepare(settings: Settings, *, show_progress: bool = True, replay: bool = True) -> Setup:
    """`settings.prepare(replay=...)` with a spinner while the trace is read (`loading`)."""
    with loading(settings.trace, show_progress):
        return settings.prepare(replay=replay)


def loading(trace: Path | None, enabled: bool = True) -> Any:
    """A spinner on stderr (terminal only) while a trace is read or the synthetic one made:
    seconds for a synthetic trace, minutes for a large expert-load.json."""
    if not enabled or not error_console.is_terminal:
        return nullcontext()
    what = f"reading {escape(str(trace))}" if trace is not None else "making the synthetic trace"
    return error_console.status(f"{what} ...")


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr; yields a callable that advances it by one. Shown only
    on a terminal: piped or redirected, a bar would leave a blank line each time."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=error_console, transient=True,
        disable=not enabled or not error_console.is_terminal,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def _one_line_warning(message: Warning | str, category: type[Warning], *args: Any,
                      **kwargs: Any) -> None:
    """`warnings.showwarning` for the CLI: "warning: ..." on one line of stderr, without the
    file and line that Python's default adds."""
    error_console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False,
                        soft_wrap=True)


def handles_errors(command: Any) -> Any:
    """Decorator: a `TapeError` (a user mistake) becomes a one-line error and exit code 2, a
    `LayoutError` naming the flags (`flag_names`); Ctrl-C, one line and exit code 130."""
    import functools

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                return command(*args, **kwargs)
        except TapeError as error:
            # A policy's or the layout's message names the library's arguments (num_gpus, ...).
            named = isinstance(error, (LayoutError, PolicyError))
            message = flag_names(str(error)) if named else str(error)
            # soft_wrap: one line however narrow the terminal (or 80 columns when piped)
            error_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False,
                                soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as interruption:
            error_console.print(str(interruption) or "interrupted", markup=False,
                                highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper


def sandbox_isolation(setting: str) -> str:
    """The isolation setting that runs here for --isolation `setting`, resolved once before any
    work: "strict" where bubblewrap runs, else "partial" (after a one-line warning, for auto);
    IsolationError (a one-line error) for strict without bubblewrap or an unknown setting."""
    import warnings

    from tape.isolation import IsolationWarning, resolve_isolation

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IsolationWarning)
        isolation = resolve_isolation(setting)
    for warning in caught:
        error_console.print(f"warning: {warning.message}", markup=False, highlight=False,
                            soft_wrap=True)
    return "strict" if isolation.name == "bwrap" else "partial"


def check_program_file(program: Path) -> None:
    """ProgramError unless `program` is a .py file (a folder names `tape evaluate-dir`)."""
    if program.is_dir():
        raise ProgramError(f"{program} is a folder; score every program in it with "
                           f"`tape evaluate-dir {program}`")
    if not program.is_file():
        raise ProgramError(f"program {program} does not exist")
    if program.suffix != ".py":
        raise ProgramError(f"program {program} is not a .py file; give a Python file that "
                           "defines rebalance_experts")
