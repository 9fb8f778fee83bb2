"""CLI: `medfm data phantom` — generate the built-in synthetic, fully labelled data set."""

from __future__ import annotations

from pathlib import Path

import typer


def phantom(
    kind: str = typer.Option("cxr", "--kind", help="cxr: 2D chest radiographs (PNG); ct3d: chest CT volumes "
                             "(NIfTI, HU)."),
    n: int = typer.Option(200, "--n", help="Number of cases (studies) to generate."),
    out: Path = typer.Option(..., "--out", help="Output folder (images/, masks/, manifest.csv, "
                             "dataset.json). "
                             "Re-running skips cases whose files exist."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    size: int = typer.Option(0, "--size", help="Image side in pixels (cxr, default 256) or voxels per axis "
                             "(ct3d, default 64)."),
    sites: int = typer.Option(3, "--sites", help="Number of acquisition sites (scanner/department styles)."),
    mask_set: str = typer.Option("organs", "--mask-set", help="Label map in the manifest's `mask` column: "
                                 "organs, findings, or all (organs with findings on top). Organ and finding "
                                 "maps are always written too (columns mask_organs, mask_findings)."),
    workers: int = typer.Option(1, "--workers",
                                help="Processes rendering in parallel (output is identical)."),
    montage_png: Path | None = typer.Option(None, "--montage",
                                            help="Also write a 16-case contact sheet PNG."),
) -> None:
    """Generate a synthetic chest X-ray or chest CT set with masks, reports, patients, sites and splits."""
    from medfm.data.phantom import montage, write_phantom

    root = write_phantom(kind, n, out, seed=seed, size=size or None, sites=sites, mask_set=mask_set,
                         workers=workers)
    typer.echo(f"wrote {n} {kind} cases to {root} (manifest.csv, dataset.json)")
    if montage_png is not None:
        typer.echo(f"montage: {montage(root, montage_png)}")


def add_commands(data_app: typer.Typer) -> None:
    """Attach `phantom` to the `data` group."""
    data_app.command("phantom")(phantom)
