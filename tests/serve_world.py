"""Small served models on real chest X-rays (Shenzhen/Montgomery, ../shared/data/cxr_lung_seg): a linear
tuberculosis classifier, a lung U-Net and a tiny CLIP run on toy image-report pairs, built once per test
session. Shared by the service, viewer, MCP and PACS-to-viewer tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

N_CASES = 32
SIZE = 64


def data_root() -> Path:
    from medfm.paths import shared_data_dir

    cxr = shared_data_dir() / "cxr_lung_seg"
    if not (cxr / "manifest.csv").is_file():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"real data missing at {cxr} (set MEDFM_DATA)")
        pytest.skip(f"real data missing at {cxr} (set MEDFM_DATA)")
    return cxr


def cxr_subset(out: Path) -> Path:
    """A manifest of N_CASES chest X-rays (half with tuberculosis) with lung masks, absolute paths."""
    cxr = data_root()
    m = pd.read_csv(cxr / "manifest.csv")
    pos, neg = m[m.tuberculosis == 1].head(N_CASES // 2), m[m.tuberculosis == 0].head(N_CASES // 2)
    sub = pd.concat([pos, neg]).sample(frac=1.0, random_state=0).reset_index(drop=True)
    sub["image"] = [str(cxr / p) for p in sub.image]
    sub["mask"] = [str(cxr / p) for p in sub["mask"]]
    k = np.arange(len(sub))
    sub["split"] = np.where(k < len(sub) - 12, "train", np.where(k < len(sub) - 6, "val", "test"))
    out.mkdir(parents=True, exist_ok=True)
    sub[["image", "mask", "tuberculosis", "site", "split"]].to_csv(out / "manifest.csv", index=False)
    return out / "manifest.csv"


def build(root: Path) -> dict[str, Path]:
    """classifier / segmenter / clip runs, the prepared store, the manifest and the toy pairs under root."""
    from medfm.data.prepare import PrepareConfig, prepare
    from medfm.models.registry import create_encoder
    from medfm.models.text import save_tiny_bert
    from medfm.tasks.adapt import fit_classifier
    from medfm.tasks.segment.train import SegTrainConfig, train_segmentation
    from medfm.tasks.vlm.data import write_toy_pairs
    from medfm.train.clip import ClipConfig, train_clip

    manifest = cxr_subset(root / "src")
    store = root / "prepared"
    cfg = PrepareConfig(size=SIZE, labels=["tuberculosis"], allow_outside=[str(data_root())])
    prepare(manifest, store, cfg, progress=False)
    torch.manual_seed(0)
    fit_classifier(create_encoder("resnet18", img_size=SIZE, width=8), store, root / "tb", method="linear")
    train_segmentation(SegTrainConfig(data=str(manifest), decoder="monai_unet", img_size=SIZE, steps=40,
                                      batch_size=4, lr=3e-3, flip=False, progress=False), root / "lungs")
    toy = write_toy_pairs(root / "pairs", n=24, size=32)
    bert = save_tiny_bert(root / "bert")
    train_clip(ClipConfig(data=str(toy), out=str(root / "clip"), text_tower=str(bert), img_size=32,
                          encoder_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
                          lock_text=-1, fusion_dim=32, decoder_dim=32, batch_size=8, epochs=1, augment=False),
               progress=False)
    return {"tb": root / "tb", "lungs": root / "lungs", "clip": root / "clip", "store": store,
            "manifest": manifest, "pairs": toy}


def load_engine(world: dict[str, Path]):  # -> medfm.serve.engine.Engine
    """Every capability: classifier, segmenter and CLIP, with a case index and an OOD reference."""
    from medfm.serve.engine import Engine

    return Engine.load([world["tb"], world["lungs"], world["clip"]], index_data=world["pairs"],
                       ood_reference=world["store"])


def first_image(world: dict[str, Path]) -> Path:
    return Path(pd.read_csv(world["manifest"]).image.iloc[-1])


def cxr_images(world: dict[str, Path], n: int) -> list[Path]:
    return [Path(p) for p in pd.read_csv(world["manifest"]).image.iloc[:n]]
