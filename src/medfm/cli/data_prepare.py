"""CLI: `medfm data prepare | info | overview` — build and inspect prepared datasets."""

from __future__ import annotations

from pathlib import Path

import typer

from medfm.errors import ConfigError


def _floats(text: str, n: int, name: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{name} must be {n} comma-separated numbers, not {text!r}") from None
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n:
        raise ConfigError(f"{name} must be {n} comma-separated numbers, not {text!r}")
    return vals


def label_lines(summary: dict) -> list[str]:
    """One terminal line per label column: the values found in the source and their counts."""
    lines = []
    for col, values in (summary.get("label_values") or {}).items():
        shown = ", ".join(f"{v or '(unlabelled)'}: {n}" for v, n in values.items())
        lines.append(f"labels '{col}' ({summary.get('task') or 'no task'}): {shown}")
    return lines


def prepare_cmd(
    src: str = typer.Argument(
        ...,
        help="A folder (recursive scan; DICOM series folders become volumes), a "
        "manifest (.csv/.parquet, see medfm.data.manifest), or an importer spec such as "
        "medmnist:breastmnist (looked up in $MEDFM_DATA/medmnist or ~/.medmnist), medmnist:/path/to/file.npz "
        "(a local MedMNIST file), nifti:DIR, dicom:DIR, cxr_lung_seg:DIR, covid_cxr_notes:DIR. "
        "See docs/input-contract.md.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder of the prepared dataset."),
    size: int | None = typer.Option(
        None,
        help="2D output size: images become SIZE x SIZE (default: a MedMNIST file's own size, e.g. 28, "
        "so small images are not upsampled; 224 otherwise).",
    ),
    resize: str = typer.Option(
        "pad", help="2D aspect handling: pad (keep the whole image), crop (fill), stretch."
    ),
    spacing: str = typer.Option(
        "1.5,1.5,1.5", help="3D target voxel spacing in mm, z,y,x (one value = iso)."
    ),
    volume_shape: str = typer.Option("96,96,96", help="3D output shape D,H,W after resampling (crop/pad)."),
    modality: str = typer.Option(
        "auto",
        help="auto|xray|ct|mr|us|other: decides intensity normalisation "
        "(CT window, MR percentiles, X-ray/US min-max or percentiles).",
    ),
    window: str = typer.Option("-1000,1000", help="CT window in HU, low,high, mapped to [0, 1]."),
    labels: str = typer.Option(
        "", help="Comma-separated label columns of the manifest (default: from dataset.json or the importer)."
    ),
    shard_size: int = typer.Option(
        1024, help="Cases per shard file (one shard is held in memory at a time)."
    ),
    workers: int = typer.Option(0, help="Decoding processes (0 = in this process)."),
    channels: int = typer.Option(1, help="Output channels: 1 (grey) or 3 (RGB)."),
    dtype: str = typer.Option(
        "auto", help="Stored dtype: auto (uint8 for 2D, float16 for 3D), uint8, float16."
    ),
    split: str = typer.Option(
        "0.7,0.1,0.2",
        help="train,val,test fractions for cases without a split (patient-level: no patient crosses splits).",
    ),
    seed: int = typer.Option(0, help="Seed of the split assignment."),
    keep_identifiers: bool = typer.Option(
        False,
        "--keep-identifiers",
        help="Keep patient/study/case IDs and source paths (folder and file names) as given instead "
        "of salted hashes. Free-text reports in a manifest column are copied as given either way: "
        "removing names from them is your responsibility.",
    ),
    salt_file: Path | None = typer.Option(
        None,
        "--salt-file",
        help="Secret salt for ID hashes (created if "
        "missing); default ~/.medfm/.medfm_salt, outside the dataset.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete OUT first instead of resuming."),
    allow_outside: list[Path] = typer.Option(
        [],
        "--allow-outside",
        help="A folder a manifest may point into besides its own (repeatable); other absolute or ../ "
        "paths are refused per row.",
    ),
    dims: int | None = typer.Option(
        None,
        "--dims",
        help="Keep only 2D images (2) or only 3D volumes (3); the others are skipped and listed. "
        "Default: a source mixing both is refused (prepare them as two datasets).",
    ),
    drop_bad_labels: bool = typer.Option(
        False,
        "--drop-bad-labels",
        help="Skip (and list) manifest rows whose label is a stray value in a column of numbers "
        "(e.g. 'maybe' among 0/1) or outside dataset.json's label_classes; default: refuse the manifest.",
    ),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Exit with status 2 when any file or row was skipped (the dataset is still written, and "
        "summary.json lists every skip). Default: only a job that prepared nothing fails.",
    ),
) -> None:
    """Prepare a dataset: resize, normalise, de-identify and shard; resumes an interrupted run."""
    from rich.console import Console

    from medfm.data.identifiers import for_terminal
    from medfm.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(
        size=size,
        resize_mode=resize,
        spacing=_floats(spacing, 3, "--spacing"),  # type: ignore[arg-type]
        volume_shape=tuple(int(v) for v in _floats(volume_shape, 3, "--volume-shape")),  # type: ignore[arg-type]
        modality=modality,
        window=_floats(window, 2, "--window"),  # type: ignore[arg-type]
        labels=[c.strip() for c in labels.split(",") if c.strip()] or None,
        shard_size=shard_size,
        channels=channels,
        dtype=dtype,
        fractions=_floats(split, 3, "--split"),  # type: ignore[arg-type]
        seed=seed,
        keep_identifiers=keep_identifiers,
        salt_file=str(salt_file) if salt_file else None,
        workers=workers,
        allow_outside=[str(p) for p in allow_outside],
        dims=dims,
        drop_bad_labels=drop_bad_labels,
    )
    summary = prepare(src, out, cfg, overwrite=overwrite)
    for warning in summary.get("warnings") or []:
        typer.echo(f"warning: {warning}", err=True)
    for line in label_lines(summary):
        typer.echo(line)
    Console().print(
        f"prepared {summary['n_cases']} cases ({summary['n_skipped']} skipped, see {out / 'summary.json'})",
        soft_wrap=True,  # one line, whatever the terminal width (scripts grep it)
    )
    map_file = summary.get("case_map_file")
    if map_file:
        # The user's own terminal may name real files; the dataset itself holds only hashed ids.
        typer.echo(f"hashed case ids -> source files: {map_file} (private, outside the dataset)")
    if summary["n_cases"] == 0:
        # Nothing usable is a failure, not a success with an empty dataset; summary.json lists why.
        first = (
            for_terminal(summary["skipped"][0], map_file) if summary["skipped"] else "no cases in the source"
        )
        typer.echo(
            f"error: {src}: no case could be prepared ({summary['n_skipped']} skipped; first: {first})",
            err=True,
        )
        raise typer.Exit(2)
    if strict and summary["n_skipped"]:
        first = for_terminal(summary["skipped"][0], map_file)
        typer.echo(f"error: {src}: {summary['n_skipped']} skipped with --strict (first: {first})", err=True)
        raise typer.Exit(2)


def info_cmd(root: Path = typer.Argument(..., help="A prepared dataset folder.")) -> None:
    """Print a prepared dataset's summary: shape, counts per split/site/label, skipped files."""
    from rich.console import Console

    from medfm.data.overview import summary_tables

    console = Console()
    for table in summary_tables(root):
        console.print(table)


def overview_cmd(
    root: Path = typer.Argument(..., help="A prepared dataset folder."),
    out: Path = typer.Option(Path("overview.html"), "--out", "-o", help="HTML file to write."),
    per_site: int = typer.Option(8, help="Sample images shown per site."),
) -> None:
    """Write a self-contained HTML overview: counts, intensity histograms and montages per site."""
    from medfm.data.overview import write_overview

    path = write_overview(root, out, per_site=per_site)
    typer.echo(f"wrote {path}")


def add_commands(data_app: typer.Typer) -> None:
    """Attach this module's commands to the `data` group."""
    data_app.command("prepare")(prepare_cmd)
    data_app.command("info")(info_cmd)
    data_app.command("overview")(overview_cmd)
