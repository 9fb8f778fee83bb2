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
_MODULES = ["data", "models", "pretrain", "adapt", "audit", "export", "predict", "vlm", "segment", "demo",
            "compress", "serve", "pacs", "mcp"]


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


def quiet_libraries() -> None:
    """Hide library chatter that is not about the user's run.

    That is Lightning's litlogger/litmodels adverts and FutureWarnings from lightning/monai internals (they
    concern those libraries' next versions, not medfm's).
    """
    import logging
    import warnings

    libs = r"(lightning|lightning_fabric|monai)(\.|$)"
    warnings.filterwarnings("ignore", category=FutureWarning, module=libs)
    # The adverts are INFO records of these loggers; real Lightning warnings are WARNING and still show.
    logging.getLogger("lightning.pytorch.trainer.connectors").setLevel(logging.WARNING)


def main() -> None:
    """Entry point: user-facing errors become one line on stderr and exit code 2, not a traceback."""
    quiet_libraries()
    try:
        app()
    except MedfmError as e:
        if os.environ.get("MEDFM_DEBUG"):
            raise
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
