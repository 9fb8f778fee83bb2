"""CLI: `medfm data` commands from data_prepare."""

from __future__ import annotations

import typer


def add_commands(data_app: typer.Typer) -> None:
    """Attach this module's commands to the `data` group."""
