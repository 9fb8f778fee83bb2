"""CLI: `medfm export` — a classifier, encoder or segmenter run to ONNX (fp32 and int8) for onnxruntime."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = ("Export a classifier run (`medfm adapt` OUT/model), an encoder run (`medfm pretrain`) or a "
        "segmenter run (`medfm segment train`) to ONNX with a dynamic batch axis (2D and 3D), checked "
        "against PyTorch within 1e-4; with int8 (default) also a dynamic int8 variant, and with --calib a "
        "static QDQ int8 variant calibrated on that dataset (whose test split gives each variant's AUROC "
        "for a classifier, its Dice per class for a segmenter). The folder is self-describing: config.json "
        "(preprocessing, classes, threshold or mask rule, input shape, parity) and README.md.")


def export(
    run: Path = typer.Argument(..., help="Classifier, encoder or segmenter run directory."),
    to: Path = typer.Option(..., "--to", help="Output folder (model.onnx, model.int8.onnx, config.json...)."),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="Also write int8 variants."),
    calib: Path | None = typer.Option(None, "--calib", help="Prepared dataset (segmenters: also an "
                                      "image/mask manifest): static int8 calibration (train split) and "
                                      "real-image parity / test-split AUROC or Dice."),
    n_calib: int = typer.Option(256, "--n-calib", help="Calibration images (at most)."),
) -> None:
    from medfm.export import export_run

    conf = export_run(run, to, int8=int8, calib_store=str(calib) if calib else None, n_calib=n_calib)
    shape = ", ".join(map(str, conf["input_shape"]))
    typer.echo(f"Exported {conf['source_kind']} run -> {to} (input (B, {shape}))")
    variants = dict(conf["variants"])
    ref = variants.pop("torch", {})
    for name, v in variants.items():
        diff = max(v["max_abs_diff"].values())
        score = f"  test AUROC {v['test_auroc']:.4f}" if v.get("test_auroc") is not None else ""
        if v.get("test_dice") is not None:
            score = f"  test Dice {v['test_dice']['mean']:.4f} ({v['test_dice_delta']['mean']:+.4f})"
        typer.echo(f"  {name:<12} {v['file']:<24} {v['bytes'] / 2**20:8.3f} MiB  max |diff| vs "
                   f"{v['vs']} {diff:.2e}{score}")
    if ref.get("test_auroc") is not None:
        typer.echo(f"  PyTorch test AUROC {ref['test_auroc']:.4f}")
    if ref.get("test_dice") is not None:
        typer.echo(f"  PyTorch test Dice {ref['test_dice']['mean']:.4f}")


def register(app: typer.Typer) -> None:
    """Add `export` to the main app."""
    app.command(name="export", help=HELP)(export)
