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
    flip: bool = typer.Option(
        True,
        help="Random left-right flips in training (--no-flip for lateralised anatomy, e.g. chest X-rays).",
    ),
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
        flip=flip,
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
    keep_components: int = typer.Option(
        None, help="Post-process: keep this many largest connected components per class (2 for lungs)."
    ),
    fill_holes: bool = typer.Option(False, help="Post-process: fill holes enclosed by each class."),
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
        keep_components=keep_components,
        fill_holes=fill_holes,
    )
    key = f"eval_{split}" + (f"_{site}" if site else "") + ("_pp" if keep_components or fill_holes else "")
    update_metrics(run, **{key: res})
    from medfm.tasks.segment.modelcard import refresh_seg_model_card

    refresh_seg_model_card(run)
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
    keep_components: int = typer.Option(
        None, help="Post-process: keep this many largest connected components per class (2 for lungs)."
    ),
    fill_holes: bool = typer.Option(False, help="Post-process: fill holes enclosed by each class."),
) -> None:
    """Write predicted masks aligned with the inputs (PNG 2D / NIfTI 3D with the input affine) + overlays."""
    import torch.nn.functional as F

    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.infer import predict_pairs
    from medfm.tasks.segment.io import write_mask_nifti, write_mask_png, write_overlay_png, write_report
    from medfm.tasks.segment.metrics import segmentation_metrics
    from medfm.tasks.segment.train import load_segmentation_run

    model, conf = load_segmentation_run(run)
    pairs = load_pairs(data, None if split == "all" else split, None, conf.get("img_size"))
    preds = predict_pairs(model, pairs, _roi(conf), keep_components=keep_components, fill_holes=fill_holes)
    rows, pngs = [], []
    for i, (case, p) in enumerate(zip(pairs.case_ids, preds)):
        cid = case.replace("/", "_")  # prepared case ids may look like paths
        m = segmentation_metrics(p[None], pairs.native_masks[i][None], conf["num_classes"], pairs.spacing[i])
        rows.append({"case": cid, "dice": m["mean"]["dice"], "hd95_mm": m["mean"]["hd95_mm"]})
        if p.ndim == 3:
            write_mask_nifti(p, out / f"{cid}_mask.nii.gz", pairs.affines[i] if pairs.affines else None)
            continue
        write_mask_png(p, out / f"{cid}_mask.png")
        if overlays:
            img = F.interpolate(pairs.images[i : i + 1], size=tuple(p.shape), mode="bilinear")[0]
            pngs.append(
                write_overlay_png(img, p, out / f"{cid}_overlay.png", reference=pairs.native_masks[i])
            )
    write_report(
        out / "report.html",
        f"Segmentation: {run.name}",
        rows,
        pngs,
        {"run": str(run), "data": str(data), "split": split, "decoder": conf["decoder"]},
    )
    typer.echo(f"wrote {len(preds)} masks and report.html to {out}")


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
    """Promptable segmentation: boxes / points on one image, or box-prompt Dice on a dataset."""
    import torch
    import torch.nn.functional as F

    from medfm.tasks.segment.data import load_pairs, read_array, to_unit
    from medfm.tasks.segment.io import write_mask_png, write_overlay_png
    from medfm.tasks.segment.prompts import evaluate_box_prompts
    from medfm.tasks.segment.runs import load_promptable

    net = load_promptable(model)
    size = net.img_size
    if data is not None:
        pairs = load_pairs(data, None if split == "all" else split, site, size)
        res = evaluate_box_prompts(net, pairs.images, pairs.masks)
        typer.echo(f"box-prompt dice {res['dice']:.4f} over {res['n']} images")
        return
    if image is None or out is None or not (box or point):
        raise ConfigError("give IMAGE, --out and at least one --box or --point (or --data to evaluate)")
    arr, _, _ = read_array(image)
    img = torch.from_numpy(to_unit(arr))
    h, w = img.shape[1:]
    x = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)
    sx, sy = size / w, size / h
    boxes = (
        torch.tensor([[float(v) * s for v, s in zip(_floats(b, 4, "--box"), (sx, sy, sx, sy))] for b in box])
        if box
        else None
    )
    pts = None
    if point:
        vals = [_floats(p, 3, "--point") for p in point]
        xy = torch.tensor([[v[0] * sx, v[1] * sy] for v in vals])[None]
        pts = (xy, torch.tensor([[int(v[2]) for v in vals]]))
    with torch.no_grad():
        emb = net.embed_image(x)
        n = len(boxes) if boxes is not None else 1
        logits, iou = net.decode(
            emb.expand(n, -1, -1, -1),
            points=None if pts is None else (pts[0].expand(n, -1, -1), pts[1].expand(n, -1)),
            boxes=boxes,
        )
        best = logits[torch.arange(n), iou.argmax(1)]
        mask = (F.interpolate(best[None], size=(h, w), mode="bilinear", align_corners=False)[0] > 0).any(0)
    write_mask_png(mask.long(), out)
    write_overlay_png(img, mask.long(), out.with_name(out.stem + "_overlay.png"))
    typer.echo(f"wrote {out} ({int(mask.sum())} pixels)")


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
    from medfm.models.seg.sam import build_promptable
    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.prompts import train_promptable_steps
    from medfm.tasks.segment.runs import save_run
    from medfm.tasks.segment.train import make_encoder

    pairs = load_pairs(data, split, None, img_size)
    kw = {"depth": encoder_depth} if encoder_depth else {}
    enc = make_encoder(encoder, 2, int(pairs.images.shape[1]), [img_size, img_size], **kw)
    heads = 8 if prompt_dim % 16 == 0 else 2
    net = build_promptable(
        enc,
        img_size,
        prompt_dim=prompt_dim,
        decoder_heads=heads,
        decoder_mlp_dim=4 * prompt_dim,
        iou_head_hidden_dim=prompt_dim,
    )
    hist = train_promptable_steps(
        net,
        pairs.images,
        pairs.masks,
        steps,
        batch_size,
        lr,
        jitter,
        correction_rounds,
        encoder_lr_scale=encoder_lr_scale,
        progress=True,
    )
    save_run(net, "segment_prompt", {"model": net.config, "final_loss": hist[-1] if hist else None}, out)
    typer.echo(f"wrote {out}")


@seg_app.command("incontext")
def incontext(
    data: Path = typer.Argument(..., help="Dataset with multi-label masks (e.g. `medfm data phantom`)."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run directory (written when training, read otherwise)."
    ),
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
    from medfm.models.seg.incontext import IncontextSegmenter
    from medfm.runs import update_metrics
    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.incontext import evaluate_incontext, train_incontext
    from medfm.tasks.segment.runs import load_incontext, save_run
    from medfm.tasks.segment.train import make_encoder

    train = load_pairs(data, "train", None, img_size)
    if train_labels:
        labels = _ints(train_labels, "--train-labels")
        kw = {"depth": encoder_depth} if encoder_depth else {}
        enc = make_encoder(
            encoder, train.images.ndim - 2, int(train.images.shape[1]), list(train.images.shape[2:]), **kw
        )
        if prior not in ("knn", "prototype"):
            raise ConfigError(f"--prior must be 'knn' or 'prototype', got {prior!r}")
        net = IncontextSegmenter(enc, dim=64, feature_size=16, prior=prior)
        hist = train_incontext(
            net,
            train.images,
            train.masks,
            labels,
            steps,
            batch_size,
            lr=lr,
            progress=True,
            task_augment=task_augment,
        )
        save_run(
            net,
            "segment_incontext",
            {
                "encoder": enc.config,
                "dim": 64,
                "feature_size": 16,
                "prior": prior,
                "train_labels": labels,
                "final_loss": hist[-1],
            },
            out,
        )
        typer.echo(f"wrote {out}")
    else:
        net, _ = load_incontext(out)
    if test_labels:
        test = load_pairs(data, "test", None, img_size)
        res = {}
        for kk in _ints(k, "--k"):
            res[f"k{kk}"] = evaluate_incontext(
                net,
                test.images,
                test.masks,
                _ints(test_labels, "--test-labels"),
                kk,
                ref_images=train.images,
                ref_masks=train.masks,
            )
            typer.echo(f"k={kk}: " + "  ".join(f"{n} {v:.4f}" for n, v in res[f"k{kk}"].items()))
        update_metrics(out, incontext_eval=res)


def _floats(v: str, n: int, name: str) -> list[float]:
    try:
        vals = [float(s) for s in v.split(",")]
    except ValueError:
        vals = []
    if len(vals) != n:
        raise ConfigError(f"{name} needs {n} comma-separated numbers, got {v!r}")
    return vals


def _ints(v: str, name: str) -> list[int]:
    try:
        return [int(s) for s in v.split(",")]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got {v!r}") from None
