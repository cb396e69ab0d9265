"""`tape place`: one placement from a trace's newest window, written where an engine reads it.

The placement is saved as `{"physical_to_logical_map": [[...S] * L]}`, the JSON that SGLang's
`--init-expert-location` takes; `--previous` reads the same format (the placement in force, so
that `tape` and `min-moves` keep experts where they are, and the table counts the moves).
`--show [LAYER]` prints the experts each GPU holds on that layer, the first by default
(`tape.assignment`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich import box
from rich.table import Table
from typer.core import TyperCommand

from tape.api import place
from tape.assignment import gpu_assignment_text, gpu_experts
from tape.cli.common import (
    JsonOption,
    console,
    escape,
    flag_names,
    handles_errors,
    prepare,
)
from tape.cli.formatting import format_value
from tape.cli.options import with_settings
from tape.costmodel import migration_metrics
from tape.errors import ConfigError, PlacementError
from tape.files import atomic_output, to_json_text
from tape.placement import Placement
from tape.policies import parse_policy_spec
from tape.protocol import window_metrics
from tape.settings import Settings, Setup

__all__ = ["MAP_KEY", "MAX_DENSE_LAYERS", "read_placement_file", "register"]

MAX_DENSE_LAYERS = 1024
"""The most --dense-layers: far more than any model has."""
MAP_KEY = "physical_to_logical_map"
"""The key of the placement in the files `tape place` reads and writes (SGLang's)."""

# Rows of the table: (metric key, label, scale); the migration rows only with --previous.
_ROWS = (
    ("gpu_balancedness", "GPU balance", 1),
    ("balancedness_score", "slot balance", 1),
    ("overall_balancedness", "overall balance", 1),
    ("ib_tokens", "IB tokens", 1),
    ("ib_tokens_over_bound", "IB / fewest", 1),
    ("step_time_s", "step time ms", 1e3),
    ("moved_experts", "moved experts", 1),
    ("ib_copies", "IB copies", 1),
    ("migration_seconds", "migration ms", 1e3),
    ("runtime_ms", "runtime ms", 1),
)


def read_placement_file(path: Path, setup: Setup, dense_layers: int = 0) -> Placement:
    """The placement in a JSON file `{"physical_to_logical_map": [[...S] * (D + L)]}`, less its
    first `dense_layers` (D) rows, checked against the trace and the layout; ConfigError
    (unreadable, not JSON, no such key) or PlacementError (a bad map, or one for another
    shape) naming the file."""
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read --previous {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"--previous {path} is not JSON: {error}") from None
    if not isinstance(data, dict) or MAP_KEY not in data:
        raise ConfigError(f"--previous {path} has no {MAP_KEY!r}: expected the JSON that "
                          f"tape place --output writes ({{{MAP_KEY!r}: [[...] * layers]}})")
    _, num_layers, num_experts = setup.windows.shape
    rows = data[MAP_KEY]
    if dense_layers:
        if not isinstance(rows, list) or len(rows) != dense_layers + num_layers:
            count = len(rows) if isinstance(rows, list) else "no"
            raise PlacementError(
                f"--previous {path} has {count} rows; expected --dense-layers {dense_layers} "
                f"+ the trace's {num_layers} layers = {dense_layers + num_layers}")
        rows = rows[dense_layers:]
    elif isinstance(rows, list) and len(rows) > num_layers:  # a file --dense-layers wrote
        extra = len(rows) - num_layers
        raise PlacementError(
            f"--previous {path} has {len(rows)} rows, the trace {num_layers} layers; if its first "
            f"{extra} are the model's dense layers, give --dense-layers {extra}")
    try:
        return Placement(rows, num_experts).validate(setup.layout, num_layers)
    except (PlacementError, ValueError, TypeError) as error:
        raise PlacementError(f"--previous {path}: {flag_names(str(error))}") from None


def _file_path(text: str) -> Path:
    """--output's or --previous's file; an empty path (say `--output "$FILE"` with FILE unset)
    is a usage error rather than the current folder."""
    if not text.strip():
        raise typer.BadParameter("an empty path; give a file name")
    return Path(text)


def _check_output(output: Path | None, overwrite: bool) -> None:
    """ConfigError before any work for an --output that cannot be written as asked."""
    if output is None:
        return
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name")
    if output.suffix != ".json":
        raise ConfigError(f"--output {output} must end in .json: SGLang's --init-expert-location "
                          f"reads a file only by that name (or .pt) and takes any other value as "
                          f"JSON text")
    if output.exists() and not overwrite:
        raise ConfigError(f"--output {output} exists; pass --overwrite to replace it")
    for parent in output.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--output {output} lies under {parent}, which is a file")


def _scores(placement: Placement, previous: Placement | None, setup: Setup,
            seconds: float) -> dict[str, float]:
    """The placement on the window it was made for: balance, traffic, step time, and the moves
    from `previous` when there is one."""
    scores = window_metrics(placement, setup.windows[-1], setup.layout, setup.model,
                            setup.cluster, setup.dispatch, setup.window_steps[-1])
    fewest = scores.pop("ib_tokens_bound", 0.0)
    if fewest > 0:
        scores["ib_tokens_over_bound"] = scores["ib_tokens"] / fewest
    if previous is not None:
        scores.update(migration_metrics(previous, placement, setup.layout, setup.model,
                                        setup.cluster))
    if seconds >= 0:
        scores["runtime_ms"] = seconds * 1e3
    return scores


def _timed_place(setup: Setup, name: str, params: dict[str, Any],
                 previous: Placement | None) -> tuple[Placement, float]:
    windows = setup.windows
    start = time.perf_counter()
    placement = place(windows[-1], setup.layout, name, previous=previous,
                      history=windows[:-1] if len(windows) > 1 else None, **params)
    return placement, time.perf_counter() - start


class _ShowTakesAnOptionalLayer(TyperCommand):
    """`tape place`'s command: a bare `--show` (at the end, or before another option) shows the
    first layer, as if `--show 0` were given; click's options take a value or none, not an
    optional one."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        args = list(args)
        for index, arg in enumerate(args):
            if arg == "--show" and (index + 1 == len(args) or args[index + 1].startswith("--")):
                args.insert(index + 1, "0")
                break
        return super().parse_args(ctx, args)


def register(app: typer.Typer) -> None:
    """Add `place` to `app`."""

    @app.command(name="place", cls=_ShowTakesAnOptionalLayer)
    @handles_errors
    @with_settings(scoring=False, sandbox=False)
    def place_command(
        settings: Settings,
        policy: Annotated[
            str, typer.Option("--policy", help="The policy, NAME[:PRESET][:KEY=VALUE...], "
                              "for example tape, tape:fast, deepseek.")
        ] = "tape",
        previous: Annotated[
            Path | None,
            typer.Option("--previous", parser=_file_path, metavar="<path>",
                         help="JSON of the placement in force (what --output writes): kept "
                         "where it pays, and the moves counted.")
        ] = None,
        output: Annotated[
            Path | None,
            typer.Option("--output", parser=_file_path, metavar="<path>",
                         help="Write the placement here (a name ending in .json) as "
                         "{\"physical_to_logical_map\": ...}, the file SGLang's "
                         "--init-expert-location reads.")
        ] = None,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace an existing --output file.")
        ] = False,
        dense_layers: Annotated[
            int, typer.Option("--dense-layers", min=0,
                              help="Leading model layers without experts, each a row of the "
                              "trivial placement (slot s holds expert s % E) before the "
                              "trace's in --output and --previous: SGLang wants a row for every "
                              "layer (3 for DeepSeek-V3 with its 58 MoE layers).")
        ] = 0,
        show: Annotated[
            int | None,
            typer.Option("--show", min=0, metavar="[LAYER]",
                         help="Print the experts each GPU holds on this layer of the trace "
                         "(from 0; the first when no layer follows), node by node.")
        ] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Place the experts for the trace's newest window; the earlier ones are the history.

        Prints its balance, traffic and step time there beside deepseek's; --output saves it.
        """
        name, params = parse_policy_spec(policy)
        if dense_layers > MAX_DENSE_LAYERS:
            raise ConfigError(f"--dense-layers must be at most {MAX_DENSE_LAYERS}, got "
                              f"{dense_layers}")
        _check_output(output, overwrite)
        if previous is not None and not previous.is_file():
            raise ConfigError(f"--previous {previous} is not a file")
        setup = prepare(settings, show_progress=not as_json, replay=False)
        in_force = None
        if previous is not None:
            in_force = read_placement_file(previous, setup, dense_layers)
        placement, seconds = _timed_place(setup, name, params, in_force)
        if show is not None:
            shown = gpu_experts(placement, setup.layout, show)  # a bad layer: before any output
        columns = {policy: _scores(placement, in_force, setup, seconds)}
        if name != "deepseek":
            reference, reference_seconds = _timed_place(setup, "deepseek", {}, in_force)
            columns["deepseek"] = _scores(reference, in_force, setup, reference_seconds)
        if in_force is not None:
            columns = {"in force": _scores(in_force, None, setup, -1.0), **columns}
        if output is not None:
            try:
                _write_placement(output, placement, dense_layers)
            except OSError as error:
                raise ConfigError(
                    f"cannot write --output {output}: {error.strerror or error}") from None
        if as_json:
            typer.echo(to_json_text({
                **setup.manifest(), "policy": policy,
                "history_windows": setup.windows.shape[0] - 1, "dense_layers": dense_layers,
                "previous": None if previous is None else str(previous),
                "output": None if output is None else str(output), "placements": columns,
                **({} if show is None else {"show": {"layer": show, "gpu_experts": shown}}),
            }))
            return
        console.print(f"[dim]{escape(setup.described)}; {escape(setup.setting())}[/]",
                      highlight=False)
        console.print(_table(columns, f"{setup.model.name} on {setup.cluster.name}"))
        if show is not None:
            console.print(f"\nexperts each GPU holds on layer {show} ({policy}):\n"
                          f"{gpu_assignment_text(placement, setup.layout, show)}", markup=False,
                          highlight=False, soft_wrap=True)
        if output is not None:
            console.print(f"wrote {output}", markup=False, highlight=False, soft_wrap=True)


def _write_placement(path: Path, placement: Placement, dense_layers: int = 0) -> None:
    """`{"physical_to_logical_map": ...}` in `path`, a layer a line, never half-written; first
    `dense_layers` rows of the trivial placement (SGLang's `init_trivial`: slot s holds expert
    s % E), for the model's layers without experts."""
    trivial = (np.arange(placement.num_slots) % placement.num_experts).tolist()
    layers = [trivial] * dense_layers + placement.phy2log.tolist()
    rows = ",\n".join(f"    {json.dumps(row)}" for row in layers)
    with atomic_output(path) as temporary:
        temporary.write_text(f'{{\n  "{MAP_KEY}": [\n{rows}\n  ]\n}}\n')


def _table(columns: dict[str, dict[str, float]], setting: str) -> Table:
    table = Table(title=f"{setting}, on the newest window (the one placed for)",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1))
    table.add_column("metric", min_width=12)
    for name in columns:
        table.add_column(escape(name), justify="right", no_wrap=True, min_width=6)
    for key, label, scale in _ROWS:
        if any(key in values for values in columns.values()):
            table.add_row(label, *(
                format_value(values[key] * scale, digits=3) if key in values else "-"
                for values in columns.values()
            ))
    return table

