"""CLI: `medfm predict` — a classifier, encoder, segmenter or exported model over files, folders, prepared
data."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = (
    "Predict with RUN (a classifier run such as `medfm adapt` OUT/model, an encoder run, a segmenter run "
    "from `medfm segment train`, or a folder written by `medfm export`) on INPUTS: image files "
    "(PNG/JPEG/DICOM/NIfTI/npz), folders and DICOM series (found like `medfm data prepare` finds them and "
    "preprocessed like the run's training data), manifests, and prepared datasets. Writes "
    "OUT/predictions.csv and .parquet (one row per case; case ids salted like prepare's unless "
    "--keep-identifiers), OUT/embeddings.npy for encoders, OUT/masks/ for segmenters (PNG at each 2D "
    "input's size, NIfTI with each volume's affine; the table gives the mask file and per-class "
    "fractions / volumes in mL), and OUT/skipped.json (unreadable files, one reason each; the job goes "
    "on). Rerunning the same command resumes an interrupted job."
)


def predict(
    run: Path = typer.Argument(..., help="Classifier, encoder or segmenter run, or an exported folder."),
    inputs: list[Path] = typer.Argument(..., help="Files, folders, manifests or prepared datasets."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass (and per saved batch)."),
    keep_identifiers: bool = typer.Option(False, "--keep-identifiers",
                                          help="Keep case ids and source paths as they are (no hashing)."),
    salt_file: str = typer.Option("", "--salt-file", help="Salt for the case-id hashes (default: "
                                  "~/.medfm/.medfm_salt, the one prepare uses)."),
    variant: str = typer.Option("fp32", help="Exported models: fp32, int8 or int8_static."),
    threads: int = typer.Option(0, help="CPU threads for torch / onnxruntime (0: leave the default)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start afresh even if OUT has a partial run."),
) -> None:
    import torch

    from medfm.predict import predict as run_predict

    if threads > 0:
        torch.set_num_threads(threads)
    res = run_predict(run, list(inputs), out, batch_size=batch_size, salt_file=salt_file or None,
                      keep_identifiers=keep_identifiers, resume=not no_resume, variant=variant,
                      threads=threads)
    typer.echo(f"{res['n_cases']} cases predicted, {res['n_skipped']} skipped "
               f"(see {Path(out) / 'skipped.json'})" if res["n_skipped"] else
               f"{res['n_cases']} cases predicted")
    rate, n_now = res["images_per_s"], res["n_predicted_now"]
    if n_now and rate is not None:
        typer.echo(f"Throughput: {rate:.1f} images/s ({n_now} images in {res['seconds']:.1f} s)")
    else:
        typer.echo("Throughput: nothing was left to predict")
    typer.echo(f"Predictions: {Path(out) / 'predictions.csv'}")


predict.__doc__ = HELP


def register(app: typer.Typer) -> None:
    """Add `predict` to the main app."""
    app.command(name="predict", help=HELP)(predict)
