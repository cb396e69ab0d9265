"""Options and helpers shared by the CLI's commands: traces, layout, presets, output."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tape.errors import TapeError, TraceError
from tape.files import write_json_atomic
from tape.layout import Layout
from tape.presets import ClusterSpec, ModelSpec, load_config

__all__ = [
    "TraceOption", "SyntheticOption", "IntervalOption", "SeedOption", "ReplicasOption",
    "GroupsOption", "NodesOption", "GpusOption", "VersionOption", "JsonOption", "ClusterOption",
    "ModelOption", "DispatchOption", "ConfigOption", "console", "error_console", "load_windows",
    "make_layout", "load_specs", "progress_bar", "write_json_atomic", "handles_errors",
]

console = Console()
error_console = Console(stderr=True)

TraceOption = Annotated[
    Optional[Path],
    typer.Option(
        "--trace", help="Expert-load trace: expert-load.json, a folder of per-layer CSVs, an "
        "SGLang .pt dump, or .npy/.npz [steps, layers, experts].",
    ),
]
SyntheticOption = Annotated[
    bool, typer.Option("--synthetic", help="Use the built-in synthetic DeepSeek-V3 trace "
                       "(the default when no --trace is given).")
]
IntervalOption = Annotated[int, typer.Option("--interval", min=1, help="Steps per window.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the synthetic trace.")]
ReplicasOption = Annotated[int, typer.Option("--replicas", help="Physical slots per layer (S).")]
GroupsOption = Annotated[int, typer.Option("--groups", help="Expert groups.")]
NodesOption = Annotated[int, typer.Option("--nodes", help="Nodes (N).")]
GpusOption = Annotated[int, typer.Option("--gpus", help="GPUs (G).")]
VersionOption = Annotated[
    str, typer.Option("--version", help="Scoring version: 0, 2, 3, 4 (the seed's) or realistic.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
ClusterOption = Annotated[
    Optional[str], typer.Option("--cluster", help="Cluster preset: h800 or h100.")
]
ModelOption = Annotated[Optional[str], typer.Option("--model", help="Model preset: deepseek-v3.")]
DispatchOption = Annotated[
    str, typer.Option("--dispatch", help="Token dispatch of the cost model: locality or uniform.")
]
ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", help="YAML/JSON file overriding model: and cluster: preset fields."),
]


def make_layout(replicas: int, groups: int, nodes: int, gpus: int) -> Layout:
    """The layout of the CLI's flags (raises LayoutError naming the broken constraint)."""
    return Layout(num_replicas=replicas, num_groups=groups, num_nodes=nodes, num_gpus=gpus)


def load_specs(config: Path | None, model: str | None, cluster: str | None, dispatch: str
               ) -> tuple[ModelSpec, ClusterSpec]:
    """Model and cluster from presets, the config file and flags; checks the dispatch name."""
    from tape.costmodel import DISPATCH_POLICIES

    if dispatch not in DISPATCH_POLICIES:
        raise TapeError(
            f"unknown dispatch {dispatch!r}; expected one of {', '.join(DISPATCH_POLICIES)}"
        )
    return load_config(config, model=model, cluster=cluster)


def load_windows(
    trace: Path | None, synthetic: bool, interval: int, seed: int, layout: Layout
) -> tuple[np.ndarray, str]:
    """Windowed loads [W, L, E] of the chosen trace and a one-line description of it."""
    from tape.protocol import check_windows
    from tape.trace import describe, load_trace, window_loads

    if trace is not None and synthetic:
        raise TraceError("give either --trace PATH or --synthetic, not both")
    if trace is None:
        from tape.synthetic import synthetic_trace

        loads = synthetic_trace(num_groups=layout.num_groups, seed=seed)
        source = f"synthetic DeepSeek-V3 trace (seed {seed})"
    else:
        loads = load_trace(trace)
        source = str(trace)
    windows = check_windows(window_loads(loads, interval), layout)
    return windows, f"{source}: {describe(loads)}, {windows.shape[0]} windows of {interval} steps"


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar on stderr; yields a callable that advances it by one."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=error_console, transient=True, disable=not enabled,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def handles_errors(command: Any) -> Any:
    """Decorator: a `TapeError` (a user mistake) becomes a one-line error and exit code 2."""
    import functools

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except TapeError as error:
            error_console.print(f"[bold red]error:[/] {error}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper
