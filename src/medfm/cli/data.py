"""CLI: `medfm data ...` — read, prepare, import and generate datasets; `medfm data probe` lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

data_app = typer.Typer(
    help="Read, prepare, import and generate medical imaging datasets.", no_args_is_help=True
)


def probe_line(path: Path, info: dict[str, Any]) -> str:
    """One line per file, the path in full: a table would cut long names so files could not be told apart."""
    spacing = " x ".join(f"{s:.3g}" for s in info.get("spacing", ()))
    kind = str(info.get("dtype") or info.get("modality") or info.get("mode") or "")
    parts = [str(path), str(info.get("format")), f"shape {tuple(info.get('shape', ()))}"]
    if spacing:
        parts.append(f"spacing {spacing} mm")
    if kind:
        parts.append(kind)
    parts += [str(v) for k, v in sorted(info.items()) if k.startswith("note")]
    return "  ".join(parts)


def probe_cmd(
    paths: list[Path] = typer.Argument(..., help="Image files or DICOM series folders."),
) -> None:
    """List format, shape, spacing and dtype of images without decoding pixels; bad files are reported.

    One line per file: PATH  FORMAT  shape (C, [D,] H, W)  spacing ... mm  DTYPE/MODALITY  [notes].
    Exit status 1 when any file could not be probed (the others are still listed).
    """
    from medfm.data.read import probe
    from medfm.errors import InputError

    bad = 0
    for path in paths:
        try:
            info = probe(path)
        except InputError as e:  # keep going: one bad file must not hide the others
            bad += 1
            typer.echo(f"{path}  error: {e.problem}")
            continue
        typer.echo(probe_line(path, info))
    if bad:
        typer.echo(f"{bad} of {len(paths)} file(s) could not be probed", err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `data` group; prepare/info/overview live in data_prepare.py, phantom in data_phantom.py."""
    from medfm.cli import data_phantom, data_prepare

    data_phantom.add_commands(data_app)
    data_prepare.add_commands(data_app)
    data_app.command("probe")(probe_cmd)
    app.add_typer(data_app, name="data")
