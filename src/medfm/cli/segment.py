"""CLI: `medfm segment train | predict | evaluate | prompt` — thin wrappers over medfm.tasks.segment."""

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
    encoder_depth: int = typer.Option(None, help="Override the encoder depth (fresh encoders only)."),
    seed: int = typer.Option(0, help="Random seed (also picks the N labelled cases)."),
) -> None:
    """Train a dense segmentation model and write a run directory."""
    from medfm.tasks.segment.train import SegTrainConfig, train_segmentation

    n = None if n_labels == "all" else _int(n_labels, "--n-labels")
    kw = {"depth": encoder_depth} if encoder_depth else {}
    cfg = SegTrainConfig(
        data=str(data),
        encoder=encoder,
        decoder=decoder,
        n_labels=n,
        train_split=split,
        site=site,
        img_size=img_size,
        patch=_size(patch),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        encoder_lr_scale=encoder_lr_scale,
        freeze_encoder=freeze_encoder,
        seed=seed,
        encoder_kwargs=kw,
    )
    run = train_segmentation(cfg, out)
    typer.echo(f"wrote {run}")


@seg_app.command("evaluate")
def evaluate(
    run: Path = typer.Argument(..., help="Run directory from `medfm segment train`."),
    data: Path = typer.Argument(..., help="Dataset with masks (as for train)."),
    split: str = typer.Option("test", help="Split to evaluate ('all' for every case)."),
    site: str = typer.Option(None, help="Only cases of this site."),
    tolerance_mm: float = typer.Option(2.0, help="Surface Dice tolerance in mm."),
) -> None:
    """Dice, HD95 (mm) and surface Dice on a dataset; merged into the run's metrics.json."""
    from medfm.runs import update_metrics
    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.infer import evaluate_model
    from medfm.tasks.segment.train import load_segmentation_run

    model, conf = load_segmentation_run(run)
    pairs = load_pairs(data, None if split == "all" else split, site, conf.get("img_size"))
    res = evaluate_model(
        model,
        pairs,
        conf["num_classes"],
        roi_size=_roi(conf),
        class_names=conf["class_names"],
        tolerance_mm=tolerance_mm,
    )
    key = f"eval_{split}" + (f"_{site}" if site else "")
    update_metrics(run, **{key: res})
    for name, m in res.items():
        typer.echo(
            f"{name}: dice {m['dice']:.4f}  hd95 {m['hd95_mm']:.2f} mm  surface dice {m['surface_dice']:.4f}"
        )


@seg_app.command("predict")
def predict(
    run: Path = typer.Argument(..., help="Run directory from `medfm segment train`."),
    data: Path = typer.Argument(..., help="Dataset (as for train); masks are used only for overlays."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for masks (PNG / NIfTI) and overlay PNGs."),
    split: str = typer.Option("test", help="Split to predict ('all' for every case)."),
    overlays: bool = typer.Option(True, help="Also write overlay PNGs (image + contours)."),
) -> None:
    """Write predicted masks aligned with the inputs (PNG 2D / NIfTI 3D with the input affine) + overlays."""
    import torch.nn.functional as F

    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.infer import predict_pairs
    from medfm.tasks.segment.io import write_mask_nifti, write_mask_png, write_overlay_png
    from medfm.tasks.segment.train import load_segmentation_run

    model, conf = load_segmentation_run(run)
    pairs = load_pairs(data, None if split == "all" else split, None, conf.get("img_size"))
    preds = predict_pairs(model, pairs, _roi(conf))
    for i, (cid, p) in enumerate(zip(pairs.case_ids, preds)):
        if p.ndim == 3:
            write_mask_nifti(p, out / f"{cid}_mask.nii.gz", pairs.affines[i] if pairs.affines else None)
            continue
        write_mask_png(p, out / f"{cid}_mask.png")
        if overlays:
            img = F.interpolate(pairs.images[i : i + 1], size=tuple(p.shape), mode="bilinear")[0]
            write_overlay_png(img, p, out / f"{cid}_overlay.png", reference=pairs.native_masks[i])
    typer.echo(f"wrote {len(preds)} masks to {out}")


def _roi(conf: dict) -> list[int] | None:
    patch, size = conf.get("patch"), conf.get("img_size")
    if conf.get("spatial_dims") == 2 and size and patch and list(patch) == [size, size]:
        return None
    return patch


def _int(v: str, name: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"{name} must be an integer or 'all', got {v!r}") from None


def _size(v: str | None) -> list[int] | None:
    if not v:
        return None
    try:
        return [int(s) for s in v.split(",")]
    except ValueError:
        raise ConfigError(f"--patch must look like 96,96 (or 64,64,64), got {v!r}") from None


def register(app: typer.Typer) -> None:
    """Add the `segment` group to the main app."""
    app.add_typer(seg_app, name="segment")
