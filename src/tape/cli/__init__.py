"""The `tape` command line: evaluate, compare, place, evolve and tune expert placements."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

__all__ = ["app", "main"]


def _no_flag_placeholders(params: list[Any]) -> list[Any]:
    """`params`, their flags (options that take no value, such as --no-cache and --help) given
    an empty metavar: typer's help shows the `<bool>` type of a flag otherwise, as if it took
    one (`--no-cache <bool>`)."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


class _TapeGroup(TyperGroup):
    """The `tape` command group; its commands' help shows flags without a placeholder."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_placeholders(super().get_params(ctx))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _no_flag_placeholders(command.get_params(ctx))
        return command


app = typer.Typer(
    name="tape",
    cls=_TapeGroup,
    help="TAPE: place, score, evolve and show expert placements for MoE serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from tape import __version__

        typer.echo(f"tape {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version,
                           help="Print TAPE's version and exit (the scoring version is "
                           "--scoring).")
    ] = False,
) -> None:
    """TAPE: place, score, evolve and show expert placements for MoE serving."""


def _register_commands() -> None:
    from tape.cli import compare, evaluate, evolve, place

    evaluate.register(app)
    compare.register(app)
    place.register(app)
    evolve.register(app)


_register_commands()


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (`kill`, `timeout`, a batch system's cancel) or SIGHUP (its terminal closed) ends
    the command like an error does, so that what it was writing is cleaned up
    (`tape.files.staged_folder`, the --out lock) and sandboxed programs are stopped; exit 128 +
    the signal's number."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry point."""
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _terminated)
    app()
