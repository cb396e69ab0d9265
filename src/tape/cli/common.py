"""Options and helpers shared by the CLI's commands: traces, layout, presets, output."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tape.cli.out_lock import out_lock
from tape.errors import (
    MAX_INTEGER,
    ConfigError,
    LayoutError,
    ProgramError,
    TapeError,
    TraceError,
    checked_integer,
    counted,
)
from tape.files import CommitError, holds_files, probe_writable, staged_folder, write_json_atomic
from tape.layout import Layout
from tape.policies import PolicyError
from tape.presets import ClusterSpec, ModelSpec, load_config

__all__ = [
    "BudgetOption",
    "ClusterOption",
    "ConfigOption",
    "DispatchOption",
    "GpusOption",
    "GroupsOption",
    "IntervalOption",
    "IsolationOption",
    "JsonOption",
    "MemoryOption",
    "ModelOption",
    "NodesOption",
    "OverwriteOption",
    "ReplicasOption",
    "SeedOption",
    "Setup",
    "SyntheticOption",
    "TimeoutOption",
    "TraceOption",
    "VersionOption",
    "check_model_shape",
    "check_out_folder",
    "check_out_writable",
    "check_program_file",
    "console",
    "error_console",
    "escape",
    "flag_names",
    "handles_errors",
    "load_windows",
    "loading",
    "nodes_for",
    "output_folder",
    "parse_out",
    "prepare",
    "progress_bar",
    "sandbox_isolation",
    "write_json_atomic",
]

console = Console()
error_console = Console(stderr=True)

TraceOption = Annotated[
    Path | None,
    typer.Option(
        "--trace", help="Expert-load trace: expert-load.json, a folder of per-layer CSVs, an "
        "SGLang .pt dump, or .npy/.npz \\[steps, layers, experts].",
    ),
]
SyntheticOption = Annotated[
    bool, typer.Option("--synthetic", help="Use the built-in synthetic DeepSeek-V3 trace "
                       "(the default when no --trace is given).")
]
IntervalOption = Annotated[int, typer.Option("--interval", min=1, help="Steps per window.")]
SeedOption = Annotated[int, typer.Option("--seed", min=0, help="Seed of the synthetic trace.")]
SyntheticModelOption = Annotated[
    str, typer.Option("--synthetic-model", help="Model of the synthetic trace: calibrated "
                      "(against the public trace's figures) or surges (the previous default: "
                      "unpredictable single-expert surges).")
]
ReplicasOption = Annotated[int, typer.Option("--replicas", help="Physical slots per layer (S).")]
GroupsOption = Annotated[int, typer.Option("--groups", help="Expert groups.")]
NodesOption = Annotated[
    int | None,
    typer.Option("--nodes", help="Nodes (N); default: GPUs / the cluster preset's GPUs per node."),
]
GpusOption = Annotated[int, typer.Option("--gpus", help="GPUs (G).")]
VersionOption = Annotated[
    str, typer.Option("--version", help="Scoring version: 0, 2, 3, 4 (the seed's) or realistic.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


def _at_most(limit: int, unit: str) -> Any:
    """An option callback refusing a value above `limit` (a usage error, as typer's `min`):
    typer's own `max` would widen the help's option column with the range, and cut lines."""

    def check(value: float | None) -> float | None:
        if value is not None and value > limit:
            raise typer.BadParameter(f"at most {limit}{unit}, got {value}{unit}")
        return value

    return check


MAX_TIMEOUT_S = 86400
"""The largest --timeout, one day: Python's waits refuse an infinite timeout, or one of about 25
days and more, with a traceback."""
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.1, callback=_at_most(MAX_TIMEOUT_S, " s"),
                        help="Seconds one call of a program may take before its process is "
                        "killed (at most a day).")
]
BudgetOption = Annotated[
    float | None, typer.Option("--budget", min=0.1, callback=_at_most(MAX_TIMEOUT_S, " s"),
                               help="Seconds all calls of one program may take together "
                               "(default 5 x --timeout); past it the program fails.")
]
IsolationOption = Annotated[
    str, typer.Option("--isolation", help="How programs are isolated: auto (bubblewrap where "
                      "it runs, else partial isolation and a warning), strict (bubblewrap, or "
                      "refuse to run) or partial.")
]
MemoryOption = Annotated[
    # more than MAX_INTEGER MB cannot be set as the process's limit (in bytes)
    int, typer.Option("--memory-mb", min=64, callback=_at_most(MAX_INTEGER, " MB"),
                      help="Memory a program's process may allocate, MB.")
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Write into an --out folder that already holds files, "
                       "replacing files of the same names.")
]
ClusterOption = Annotated[
    str | None, typer.Option("--cluster", help="Cluster preset: h800 or h100 (default: the "
                             "config file's cluster: preset:, else h800).")
]
ModelOption = Annotated[
    str | None, typer.Option("--model", help="Model preset: deepseek-v3 (default: the config "
                             "file's model: preset:, else deepseek-v3).")
]
DispatchOption = Annotated[
    str, typer.Option("--dispatch", help="Token dispatch of the cost model: locality or uniform.")
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="YAML/JSON file overriding model: and cluster: preset fields."),
]


@dataclass(frozen=True)
class Setup:
    """What every scoring command needs: layout, presets, dispatch and the windowed trace."""

    layout: Layout
    model: ModelSpec
    cluster: ClusterSpec
    dispatch: str
    windows: np.ndarray
    described: str
    interval: int
    window_steps: tuple[int, ...]

    def manifest(self) -> dict[str, Any]:
        """The settings of a run, for the manifest beside its results."""
        layout = self.layout
        return {
            "trace": self.described, "interval": self.interval, "dispatch": self.dispatch,
            "layout": {"replicas": layout.num_replicas, "groups": layout.num_groups,
                       "nodes": layout.num_nodes, "gpus": layout.num_gpus},
            "model": dataclasses.asdict(self.model), "cluster": dataclasses.asdict(self.cluster),
        }


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


_FLAGS = {"num_replicas": "--replicas", "num_groups": "--groups", "num_nodes": "--nodes",
          "num_gpus": "--gpus"}


def flag_names(message: str) -> str:
    """`message` with the layout's argument names (num_gpus, ...) as the flags that set them
    (--gpus, ...): the library's messages name its arguments, a CLI user typed flags."""
    return re.sub(r"\b(?:num_replicas|num_groups|num_nodes|num_gpus)\b",
                  lambda match: _FLAGS[match[0]], message)


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


def nodes_for(nodes: int | None, gpus: int, cluster: ClusterSpec) -> int:
    """--nodes, or else G / the cluster preset's GPUs per node (1 node for a smaller G)."""
    if nodes is not None:
        return nodes
    if gpus <= cluster.gpus_per_node:
        return 1
    if gpus % cluster.gpus_per_node:
        raise LayoutError(
            f"--gpus {gpus} is not a multiple of the {cluster.name} preset's "
            f"{cluster.gpus_per_node} GPUs per node; give --nodes"
        )
    return gpus // cluster.gpus_per_node


def prepare(
    *, trace: Path | None, synthetic: bool, interval: int, seed: int, replicas: int,
    groups: int, nodes: int | None, gpus: int, cluster: str | None, model: str | None,
    dispatch: str, config: Path | None, show_progress: bool = True,
    synthetic_model: str = "calibrated", replay: bool = True,
) -> Setup:
    """Check the flags, load presets and the trace; raise TapeError naming what is wrong.
    `replay`: the trace must have the 2 windows a replay needs (else one is enough)."""
    from tape.dispatch import check_dispatch

    check_dispatch(dispatch)
    model_spec, cluster_spec = load_config(config, model=model, cluster=cluster)
    nodes = nodes_for(nodes, gpus, cluster_spec)
    layout = Layout(num_replicas=replicas, num_groups=groups, num_nodes=nodes, num_gpus=gpus)
    with loading(trace, show_progress):
        windows, described, steps = load_windows(trace, synthetic, interval, seed, layout,
                                                 synthetic_model, replay)
    if config is not None:
        check_model_shape(config, windows.shape[1:], layout.num_groups)
    return Setup(layout, model_spec, cluster_spec, dispatch, windows, described, interval, steps)


def check_model_shape(config: Path, shape: tuple[int, ...], groups: int) -> None:
    """ConfigError if the config file's model section sets a shape (layers, experts, groups)
    other than the trace's and --groups: the cost model takes the shape from those, so the
    file's value would be ignored without a word."""
    from tape.presets import read_mapping_file

    model = read_mapping_file(config, "config file").get("model") or {}
    for key, actual, source in (("num_layers", shape[0], "the trace's layers"),
                                ("num_experts", shape[1], "the trace's experts"),
                                ("num_groups", groups, "--groups")):
        if key in model and model[key] != actual:
            raise ConfigError(f"config file {config}: model {key} is {model[key]!r} but "
                              f"{source} are {actual}; the cost model takes the shape from the "
                              f"trace and the flags: fix or remove {key}")


def load_windows(
    trace: Path | None, synthetic: bool, interval: int, seed: int, layout: Layout,
    synthetic_model: str = "calibrated", replay: bool = True,
) -> tuple[np.ndarray, str, tuple[int, ...]]:
    """Windowed loads [W, L, E] of the chosen trace, a one-line description of it, and the
    forward steps in each window (the last window may be shorter); at least 2 windows with
    `replay`."""
    from tape.protocol import check_windows
    from tape.trace import describe, load_trace, window_loads

    checked_integer(interval, "--interval", TraceError)  # the flag, not window_loads' argument
    if trace is not None and synthetic:
        raise TraceError("give either --trace PATH or --synthetic, not both")
    if trace is not None and synthetic_model != "calibrated":
        raise TraceError("--synthetic-model applies to the synthetic trace, not to --trace")
    if trace is not None and seed != 0:  # runs with --seed 1, 2, ... would all be the same
        raise TraceError("--seed applies to the synthetic trace, not to --trace")
    if trace is None:
        from tape.synthetic import synthetic_trace, trace_model

        if seed > MAX_INTEGER:
            raise TraceError(f"--seed must be at most {MAX_INTEGER}, got {seed}")
        chosen = trace_model(synthetic_model)
        try:
            loads = synthetic_trace(num_groups=layout.num_groups, seed=seed, model=chosen)
        except TraceError as error:
            raise TraceError(f"cannot make the synthetic DeepSeek-V3 trace with --groups "
                             f"{layout.num_groups} and --seed {seed}: "
                             f"{flag_names(str(error))}") from None
        source = f"synthetic DeepSeek-V3 trace ({synthetic_model} model, seed {seed})"
    else:
        loads = load_trace(trace)
        source = str(trace)
    # one step is one window where no replay is made (`tape place`)
    windowed = loads if not replay and loads.shape[0] == 1 else window_loads(loads, interval)
    windows = check_windows(windowed, layout, replay=replay)
    total = loads.shape[0]
    steps = tuple(min(interval, total - start) for start in range(0, total, interval))
    described = (f"{source}: {describe(loads)}, {counted(windows.shape[0], 'window')} of "
                 f"{counted(interval, 'step')}")
    return windows, described, steps


def loading(trace: Path | None, enabled: bool = True) -> Any:
    """A spinner on stderr (terminal only) while a trace is read or the synthetic one made:
    seconds for the synthetic DeepSeek-V3 trace, minutes for a large expert-load.json."""
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


def handles_errors(command: Any) -> Any:
    """Decorator: a `TapeError` (a user mistake) becomes a one-line error and exit code 2, a
    `LayoutError` naming the flags (`flag_names`); Ctrl-C, one line and exit code 130."""
    import functools

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
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
