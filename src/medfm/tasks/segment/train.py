"""Train a segmentation model (foundation encoder + dense decoder, or a MONAI UNet baseline) into a run dir.

Run directory: ``config.json`` (enough to rebuild), ``seg_model.safetensors`` (encoder + decoder),
``model.safetensors`` (the encoder alone, so ``medfm.load_encoder`` works on it too), ``metrics.json``,
``README.md`` (model card, medfm.modelcard); evaluations are written elsewhere (``segment evaluate -o``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medfm.errors import ConfigError, InputError
from medfm.models.seg.registry import BaselineModel, SegmentationModel, build_segmentation_model, monai_unet
from medfm.rundir import RunDir
from medfm.tasks.segment.data import CropDataset, SegPairs, load_pairs
from medfm.tasks.segment.runs import save_run


@dataclass
class SegTrainConfig:
    """Options of `medfm segment train` (see the CLI help for each)."""

    data: str = ""
    encoder: str = "vit_tiny"  # registry name, or a run directory / checkpoint (pretrained)
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    decoder: str = "auto"  # auto | unetr | unet | monai_unet (baseline without an encoder)
    train_split: str | None = "train"
    site: str | None = None
    n_labels: int | None = None  # use only the first N labelled training cases (after shuffling)
    img_size: int | None = 128  # 2D images resized to img_size^2; volumes keep their grid
    patch: list[int] | None = None  # training crop / inference window; default: the whole (resized) image
    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-3
    encoder_lr_scale: float = 0.1
    freeze_encoder: bool = False
    feature_size: int = 16
    num_classes: int | None = None  # background included; default: max label + 1 (at least 2)
    class_names: list[str] | None = None
    seed: int = 0
    augment: bool = True
    flip: bool = True  # random left-right flips (part of augment); off for lateralised anatomy (CXR)
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed (checked against the device: train/precision.py)
    compile: bool = False  # torch.compile the model (eager with one warning if it fails)
    progress: bool = True


def make_encoder(
    spec: str, spatial_dims: int, in_chans: int, img_size: list[int], **kw: Any
) -> torch.nn.Module:
    """A fresh registry encoder, or a pretrained one from a run directory / checkpoint path."""
    if Path(spec).exists():
        from medfm.models.io import load_encoder

        enc = load_encoder(spec, **kw)
        if int(enc.spatial_dims) != spatial_dims:
            raise ConfigError(f"encoder {spec} is {enc.spatial_dims}D but the data is {spatial_dims}D")
        return enc
    from medfm.models.registry import create_encoder

    return create_encoder(spec, spatial_dims=spatial_dims, in_chans=in_chans, img_size=img_size, **kw)


def build_model(
    cfg: SegTrainConfig, spatial_dims: int, in_chans: int, patch: list[int], num_classes: int
) -> SegmentationModel | BaselineModel:
    if cfg.decoder == "monai_unet":
        return monai_unet(spatial_dims, in_chans, num_classes, channels=unet_channels(patch))
    enc = make_encoder(cfg.encoder, spatial_dims, in_chans, patch, **cfg.encoder_kwargs)
    return build_segmentation_model(enc, num_classes, cfg.decoder, cfg.feature_size)


def unet_channels(patch: list[int]) -> tuple[int, ...]:
    """MONAI UNet widths: up to 4 downsamplings, fewer for small patches (>= 2 voxels at the bottleneck)."""
    n_down = max(1, min(4, int(math.log2(max(2, min(patch)) / 2))))
    return tuple(16 * 2**i for i in range(n_down + 1))


def select_labels(pairs: SegPairs, n: int | None, seed: int) -> SegPairs:
    """A fixed random subset of N labelled cases (the label-efficiency axis: 10 / 50 / all)."""
    if n is None or n >= len(pairs):
        return pairs
    if n < 1:
        raise ConfigError(f"--n-labels must be >= 1, got {n}")
    idx = sorted(np.random.default_rng(seed).permutation(len(pairs))[:n].tolist())
    return pairs.subset(idx)


def fit(model: torch.nn.Module, pairs: SegPairs, patch: list[int], cfg: SegTrainConfig) -> float:
    """Train in place; returns wall seconds."""
    return float(fit_measured(model, pairs, patch, cfg)["train_seconds"])


def fit_measured(model: torch.nn.Module, pairs: SegPairs, patch: list[int], cfg: SegTrainConfig
                 ) -> dict[str, Any]:
    """Train in place; returns ``train_seconds`` and the data-wait share / step time (for metrics.json)."""
    from medfm.train.callbacks import DataWait
    from medfm.train.precision import maybe_compile, uncompile
    from medfm.train.segmentation import SegmentationModule, make_trainer

    torch.manual_seed(cfg.seed)
    ds = CropDataset(
        pairs, tuple(patch), cfg.augment, length=cfg.steps * cfg.batch_size, seed=cfg.seed, flip=cfg.flip
    )
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
    module = SegmentationModule(
        model,
        lr=cfg.lr,
        encoder_lr_scale=cfg.encoder_lr_scale,
        freeze_encoder=cfg.freeze_encoder,
        max_steps=cfg.steps,
    )
    wait = DataWait()
    trainer = make_trainer(cfg.steps, progress=cfg.progress, callbacks=[wait], precision=cfg.precision)
    maybe_compile(model, cfg.compile)
    t0 = time.time()
    try:
        trainer.fit(module, loader)
    finally:
        uncompile(model)
    return {"train_seconds": time.time() - t0, **wait.summary()}


def train_segmentation(cfg: SegTrainConfig, out: str | Path, pairs: SegPairs | None = None) -> Path:
    """Load data, build, train, and write the run directory. ``pairs`` skips loading (benchmarks reuse it)."""
    out = Path(out)
    if pairs is None:
        pairs = load_pairs(cfg.data, cfg.train_split, cfg.site, cfg.img_size)
    pairs = select_labels(pairs, cfg.n_labels, cfg.seed)
    spatial_dims, in_chans = pairs.images.ndim - 2, int(pairs.images.shape[1])
    patch = list(cfg.patch) if cfg.patch else [int(s) for s in pairs.images.shape[2:]]
    if len(patch) != spatial_dims:
        raise ConfigError(f"patch {patch} has {len(patch)} entries but the data is {spatial_dims}D")
    num_classes = cfg.num_classes or max(2, int(pairs.masks.max()) + 1)
    if int(pairs.masks.max()) >= num_classes:
        raise InputError(cfg.data, f"mask label {int(pairs.masks.max())} >= num_classes {num_classes}")
    model = build_model(cfg, spatial_dims, in_chans, patch, num_classes)
    speed = fit_measured(model, pairs, patch, cfg)
    speed["train_seconds"] = round(speed["train_seconds"], 1)
    enc = getattr(model, "encoder", None)
    conf = {
        "train": asdict(cfg),
        "preprocessing": pairs.spec,
        "num_classes": num_classes,
        "spatial_dims": spatial_dims,
        "in_chans": in_chans,
        "patch": patch,
        "img_size": cfg.img_size,
        "decoder": getattr(model, "decoder_name", "monai_unet"),
        "feature_size": cfg.feature_size,
        "encoder": enc.config if enc is not None else None,
        "class_names": cfg.class_names or dataset_class_names(cfg.data, num_classes),
        "n_train": len(pairs),
        "data": {
            "path": cfg.data,
            "split": cfg.train_split,
            "images": len(pairs),
            "sites": [cfg.site] if cfg.site else None,
        },
    }
    save_run(model, "segmenter", conf, out)
    run = RunDir(out, kind="segmenter")
    run.write_metrics({**speed, "n_train": len(pairs), "precision": cfg.precision, "compile": cfg.compile})
    run.write_card()
    return out


def dataset_class_names(data: str, num_classes: int) -> list[str]:
    """Foreground class names from a dataset.json "mask_labels" beside the data (phantoms, prepare), else
    class_1, class_2, ..."""
    from medfm.data.summary import SUMMARY_FILE, load_summary

    root = Path(data) if data else None
    names: dict = {}
    for cand in [root / "dataset.json", root / SUMMARY_FILE, root.parent / "dataset.json"] if root else []:
        if not cand.is_file():
            continue
        if cand.name == SUMMARY_FILE:  # a prepared store: read (and validate) it the one way
            names = load_summary(root).mask_label_names or {}
        else:
            try:
                info = json.loads(cand.read_text())
                names = info.get("mask_labels") or {}
            except (json.JSONDecodeError, AttributeError):
                names = {}
        break
    return [str(names.get(str(k), f"class_{k}")) for k in range(1, num_classes)]
