"""The `tape` command line: evaluate, compare, evolve and tune expert placements."""

from __future__ import annotations

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="tape",
    help="TAPE: place, score, evolve and show expert placements for MoE serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_commands() -> None:
    from tape.cli import compare, evaluate, evolve

    evaluate.register(app)
    compare.register(app)
    evolve.register(app)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    app()
