"""CLI: pretrain commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the pretrain commands to the main app (filled in by the issue that owns them)."""
