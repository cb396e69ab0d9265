"""The `tape` command line: evaluate, compare, evolve and tune expert placements."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="tape",
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
                           help="Print TAPE's version and exit (after a command, --version "
                           "is the scoring version).")
    ] = False,
) -> None:
    """TAPE: place, score, evolve and show expert placements for MoE serving."""


def _register_commands() -> None:
    from tape.cli import compare, evaluate, evolve

    evaluate.register(app)
    compare.register(app)
    evolve.register(app)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    app()
