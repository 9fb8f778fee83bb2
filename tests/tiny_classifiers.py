"""Tiny linear-probe classifier runs (ViT and ResNet) shared by the export and compression tests."""

from __future__ import annotations

from pathlib import Path

import torch

from test_adapt import make_prepared  # tests/ is on sys.path (pytest rootdir import mode)

TINY = {"vit_tiny": dict(patch_size=4, depth=2, embed_dim=32, num_heads=2), "resnet18": dict(width=8)}


def build_world(root: Path) -> dict:
    """A 60-case prepared store in root/data and one linear-probe run per TINY encoder in root/<name>."""
    from medfm.models.registry import create_encoder
    from medfm.tasks.adapt import fit_classifier

    data = make_prepared(root / "data", n=60)
    for name, kw in TINY.items():
        torch.manual_seed(0)
        fit_classifier(create_encoder(name, img_size=16, **kw), data, root / name, method="linear")
    return {"root": root, "data": data}
