"""CLI: `medfm data ...` — read, prepare, import and generate datasets."""

from __future__ import annotations

import typer

data_app = typer.Typer(
    help="Read, prepare, import and generate medical imaging datasets.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    """Add the `data` group; its commands live in data_prepare.py and data_phantom.py."""
    from medfm.cli import data_phantom, data_prepare

    data_phantom.add_commands(data_app)
    data_prepare.add_commands(data_app)
    app.add_typer(data_app, name="data")
