"""CLI: `medfm segment train | evaluate | predict | prompt | prompt-train | incontext`: each parses its
options, calls one medfm.tasks.segment function (options -> configs: tasks/segment/options.py), prints."""

from __future__ import annotations

from pathlib import Path

import typer

from medfm.errors import ConfigError

seg_app = typer.Typer(
    help="Segmentation with foundation encoders: dense, promptable, in-context.", no_args_is_help=True
)


@seg_app.command("train")
def train(
    data: Path = typer.Argument(
        ..., help="Prepared dataset dir, or a folder/CSV with image,mask[,split,site]."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    encoder: str = typer.Option(
        "vit_tiny", help="Encoder registry name, or a pretrained run dir / checkpoint."
    ),
    decoder: str = typer.Option(
        "auto", help="auto (by encoder family) | unetr | unet | monai_unet (baseline)."
    ),
    n_labels: str = typer.Option(
        "all", "--n-labels", help="Labelled training cases to use: a number or 'all'."
    ),
    split: str = typer.Option("train", help="Split of the manifest to train on."),
    site: str = typer.Option(None, help="Only cases of this site (manifest column 'site')."),
    img_size: int = typer.Option(128, help="2D images are resized to this square size."),
    patch: str = typer.Option(None, help="Training crop / sliding-window size, e.g. 96,96 (default: image)."),
    steps: int = typer.Option(500, help="Optimisation steps."),
    batch_size: int = typer.Option(8, help="Batch size."),
    lr: float = typer.Option(1e-3, help="Learning rate of the decoder."),
    encoder_lr_scale: float = typer.Option(0.1, help="Encoder lr = lr x this (gentler fine-tuning)."),
    freeze_encoder: bool = typer.Option(False, help="Keep the encoder fixed."),
    flip: bool = typer.Option(
        True,
        help="Random left-right flips in training (--no-flip for lateralised anatomy, e.g. chest X-rays).",
    ),
    encoder_depth: int = typer.Option(None, help="Override the encoder depth (fresh encoders only)."),
    seed: int = typer.Option(0, help="Random seed (also picks the N labelled cases)."),
    precision: str = typer.Option("32", help="32 | bf16-mixed | 16-mixed (16-mixed: GPU only)."),
    compile: bool = typer.Option(
        False, "--compile/--no-compile", help="torch.compile the model (eager with a warning if it fails)."
    ),
) -> None:
    """Train a dense segmentation model and write a run directory."""
    options = dict(locals())  # the parsed options, named like SegTrainConfig's fields
    from medfm.rundir import read_json
    from medfm.tasks.segment.options import seg_train_config
    from medfm.tasks.segment.train import train_segmentation
    from medfm.train.precision import describe_speed

    run = train_segmentation(seg_train_config(options), out)
    speed = describe_speed(read_json(Path(run) / "metrics.json"))
    typer.echo(f"wrote {run}" + (f" ({speed})" if speed else ""))


@seg_app.command("evaluate")
def evaluate(
    run: Path = typer.Argument(..., help="Run directory from `medfm segment train` (only read)."),
    data: Path = typer.Argument(..., help="Dataset with masks (as for train)."),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="Folder for metrics.json and a model card with these results "
        "(the run directory is never changed).",
    ),
    split: str = typer.Option("test", help="Split to evaluate ('all' for every case)."),
    site: str = typer.Option(None, help="Only cases of this site."),
    tolerance_mm: float = typer.Option(2.0, help="Surface Dice tolerance in mm (pixels for PNGs)."),
    keep_components: int = typer.Option(
        None, help="Post-process: keep this many largest connected components per class (2 for lungs)."
    ),
    fill_holes: bool = typer.Option(False, help="Post-process: fill holes enclosed by each class."),
) -> None:
    """Dice, HD95 (mm, or px for images without pixel spacing) and surface Dice on a dataset."""
    from medfm.tasks.segment.jobs import evaluate_run

    res = evaluate_run(run, data, split, site, tolerance_mm, keep_components, fill_holes, out)
    for name, m in next(iter(res.values())).items():
        typer.echo(
            f"{name}: dice {m['dice']:.4f}  hd95 {m['hd95_mm']:.2f} {m['hd95_unit']}  "
            f"surface dice {m['surface_dice']:.4f}"
        )
    if out is not None:
        typer.echo(f"wrote {out / 'metrics.json'}")


@seg_app.command("predict")
def predict(
    run: Path = typer.Argument(..., help="Run directory from `medfm segment train`."),
    data: Path = typer.Argument(..., help="Dataset (as for train); masks are used only for overlays."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for masks (PNG / NIfTI) and overlay PNGs."),
    split: str = typer.Option("test", help="Split to predict ('all' for every case)."),
    overlays: bool = typer.Option(True, help="Also write overlay PNGs (image + contours)."),
    keep_components: int = typer.Option(
        None, help="Post-process: keep this many largest connected components per class (2 for lungs)."
    ),
    fill_holes: bool = typer.Option(False, help="Post-process: fill holes enclosed by each class."),
) -> None:
    """Write predicted masks aligned with the inputs (PNG 2D / NIfTI 3D with the input affine) + overlays.

    Raw files are read and normalised exactly as the run's training images were (its recorded
    preprocessing)."""
    from medfm.tasks.segment.jobs import predict_run

    n = predict_run(run, data, out, split, overlays, keep_components, fill_holes)
    typer.echo(f"wrote {n} masks and report.html to {out}")


def register(app: typer.Typer) -> None:
    """Add the `segment` group to the main app."""
    app.add_typer(seg_app, name="segment")


@seg_app.command("prompt")
def prompt(
    model: Path = typer.Argument(
        ..., help="Promptable run dir (`segment prompt-train`) or a SAM/MedSAM file."
    ),
    image: Path = typer.Argument(None, help="One image to segment with --box / --point prompts."),
    box: list[str] = typer.Option(
        None, "--box", help="x0,y0,x1,y1 in pixels of the input image; repeatable."
    ),
    point: list[str] = typer.Option(None, "--point", help="x,y,label (1 inside, 0 outside); repeatable."),
    out: Path = typer.Option(
        None, "--out", "-o", help="Mask PNG to write (an overlay PNG is written beside it)."
    ),
    data: Path = typer.Option(
        None,
        help="Instead of one image: a dataset with masks; reports Dice of one box "
        "per object (boxes simulated from the reference masks).",
    ),
    split: str = typer.Option("test", help="Split of --data to evaluate ('all' for every case)."),
    site: str = typer.Option(None, help="Only cases of this site (with --data)."),
) -> None:
    """Promptable segmentation: boxes / points on one image, or box-prompt Dice on a dataset.

    The image is read and preprocessed as the run's training images were (PNG, DICOM, NIfTI, ...); box and
    point coordinates are pixels of the input image."""
    from medfm.tasks.segment.jobs import evaluate_prompts, prompt_image
    from medfm.tasks.segment.options import floats

    if data is not None:
        res = evaluate_prompts(model, data, split, site)
        typer.echo(f"box-prompt dice {res['dice']:.4f} over {res['n']} images")
        return
    if image is None or out is None or not (box or point):
        raise ConfigError("give IMAGE, --out and at least one --box or --point (or --data to evaluate)")
    boxes = [floats(b, 4, "--box") for b in box] if box else None
    points = [floats(p, 3, "--point") for p in point] if point else None
    n = prompt_image(model, image, out, boxes, points)
    typer.echo(f"wrote {out} ({n} pixels)")


@seg_app.command("prompt-train")
def prompt_train(
    data: Path = typer.Argument(..., help="Dataset with masks (as for train)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    encoder: str = typer.Option(
        "vit_tiny", help="Encoder registry name, or a pretrained run dir / checkpoint."
    ),
    img_size: int = typer.Option(128, help="Images are resized to this square size."),
    steps: int = typer.Option(300, help="Optimisation steps."),
    batch_size: int = typer.Option(8, help="Batch size."),
    lr: float = typer.Option(1e-3, help="Learning rate of neck / prompt encoder / mask decoder."),
    encoder_lr_scale: float = typer.Option(0.1, help="Encoder lr = lr x this."),
    prompt_dim: int = typer.Option(128, help="Width of prompt embeddings and mask decoder (SAM: 256)."),
    jitter: float = typer.Option(0.1, help="Box jitter as a fraction of the box size."),
    correction_rounds: int = typer.Option(0, help="Extra corrective-click rounds per step (SAM-style)."),
    split: str = typer.Option("train", help="Split to train on."),
    encoder_depth: int = typer.Option(None, help="Override the encoder depth (fresh encoders only)."),
) -> None:
    """Train a promptable (SAM-style) model with box / point prompts simulated from the masks."""
    options = dict(locals())  # named like PromptTrainConfig's fields
    from medfm.tasks.segment.jobs import train_promptable_run
    from medfm.tasks.segment.options import prompt_train_config

    typer.echo(f"wrote {train_promptable_run(prompt_train_config(options), out)}")


@seg_app.command("incontext")
def incontext(
    data: Path = typer.Argument(..., help="Dataset with multi-label masks (e.g. `medfm data phantom`)."),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="With --train-labels: the run directory to write. Evaluating an existing "
        "--run: the folder for its metrics.json (the run is never changed).",
    ),
    run: Path = typer.Option(None, "--run", help="Evaluate this trained in-context run (no training)."),
    train_labels: str = typer.Option(None, help="Train episodically on these label ids, e.g. 1,2,5."),
    test_labels: str = typer.Option(None, help="Evaluate on these (held-out) label ids, e.g. 3,4."),
    k: str = typer.Option("1,5", help="Numbers of reference images to evaluate with."),
    encoder: str = typer.Option(
        "vit_tiny", help="Encoder registry name, or a pretrained run dir / checkpoint."
    ),
    img_size: int = typer.Option(128, help="2D images are resized to this square size."),
    steps: int = typer.Option(300, help="Training episodes batches."),
    batch_size: int = typer.Option(4, help="Episodes per step."),
    lr: float = typer.Option(1e-3, help="Learning rate."),
    encoder_depth: int = typer.Option(None, help="Override the encoder depth (fresh encoders only)."),
    patch_size: int = typer.Option(None, help="Override the encoder patch size (fresh ViTs only)."),
    embed_dim: int = typer.Option(None, help="Override the encoder width (fresh encoders only)."),
    num_heads: int = typer.Option(
        None, help="Override the encoder's attention heads (must divide the width)."
    ),
    prior: str = typer.Option(
        "knn",
        help="Reference-driven prior: 'knn' (query positions attend to reference positions and read their "
        "mask; generalises better to new structures) or 'prototype' (one fg/bg prototype pair only).",
    ),
    task_augment: float = typer.Option(
        0.5, help="Fraction of training episodes with synthetic tasks (label unions, intensity bands)."
    ),
) -> None:
    """In-context segmentation: train episodically (--train-labels) and/or evaluate on held-out labels with
    k references and no weight update (--test-labels; queries from split 'test', references from 'train')."""
    options = dict(locals())  # named like IncontextConfig's fields
    from medfm.tasks.segment.jobs import incontext_run
    from medfm.tasks.segment.options import incontext_config, ints

    if bool(train_labels) == bool(run):
        raise ConfigError(
            "give --train-labels (train into --out) or --run (evaluate it), not both or neither"
        )
    cfg = incontext_config(options) if train_labels else None
    tests = ints(test_labels, "--test-labels") if test_labels else None
    run, res = incontext_run(cfg, run, data, out, tests, ints(k, "--k"))
    if cfg is not None:
        typer.echo(f"wrote {run}")
    for name, r in (res or {}).items():
        typer.echo(f"k={name[1:]}: " + "  ".join(f"{n} {v:.4f}" for n, v in r.items()))
    if res is not None and cfg is None:
        typer.echo(f"wrote {out / 'metrics.json'}")
