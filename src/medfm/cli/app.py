"""The `medfm` command. Thin: each verb group lives in its own module and calls the library."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from medfm.errors import MedfmError

app = typer.Typer(
    name="medfm",
    help="Medical imaging foundation models: prepare data, pretrain, adapt, evaluate, segment, "
    "vision-language.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module defines `register(app)`; a module that fails to import must not break the others.
_MODULES = ["data", "models", "pretrain", "adapt", "vlm", "segment", "demo"]


@app.command()
def version() -> None:
    """Print the medfm version."""
    from medfm import __version__

    typer.echo(__version__)


def _register_all() -> None:
    for name in _MODULES:
        mod = importlib.import_module(f"medfm.cli.{name}")
        mod.register(app)


_register_all()


def main() -> None:
    """Entry point: user-facing errors become one line on stderr and exit code 2, not a traceback."""
    try:
        app()
    except MedfmError as e:
        if os.environ.get("MEDFM_DEBUG"):
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
