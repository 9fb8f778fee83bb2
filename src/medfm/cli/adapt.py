"""CLI: adapt commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the adapt commands to the main app (filled in by the issue that owns them)."""
