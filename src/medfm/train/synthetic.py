"""A tiny synthetic prepared dataset (store layout) for smoke tests, benchmarks and examples.

Images are smooth structured pictures (an elliptic "body" with a few blobs and a gradient) so that masked
reconstruction and contrastive learning have something to learn; several images share a patient id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.store import MANIFEST_COLUMNS
from medfm.data.store_writer import StoreWriter
from medfm.data.summary import Summary


def synthetic_images(n: int, size: int, spatial_dims: int = 2, seed: int = 0) -> np.ndarray:
    """(n, 1, *[size]*dims) uint8 images."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, size)] * spatial_dims, indexing="ij")
    out = np.empty((n, 1) + (size,) * spatial_dims, dtype=np.uint8)
    for i in range(n):
        r2 = sum((a / rng.uniform(0.6, 0.95)) ** 2 for a in axes)
        img = 0.35 * (r2 < 1) + 0.15 * (axes[-1] + 1) / 2
        for _ in range(rng.integers(2, 5)):
            c = rng.uniform(-0.6, 0.6, spatial_dims)
            s = rng.uniform(0.08, 0.25)
            img = img + rng.uniform(0.2, 0.5) * np.exp(
                -sum((a - ci) ** 2 for a, ci in zip(axes, c)) / (2 * s * s)
            )
        img = img + rng.normal(0, 0.02, img.shape)
        out[i, 0] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return out


def write_synthetic_dataset(
    root: str | Path,
    n: int = 32,
    size: int = 32,
    spatial_dims: int = 2,
    images_per_patient: int = 2,
    shard_size: int = 16,
    seed: int = 0,
    split: str = "train",
) -> Path:
    """Write ``n`` synthetic images as a prepared dataset at ``root``; returns root."""
    root = Path(root)
    writer = StoreWriter(root)
    imgs = synthetic_images(n, size, spatial_dims, seed)
    rows = []
    for s0 in range(0, n, shard_size):
        writer.write_shard(s0 // shard_size, imgs[s0 : s0 + shard_size])
    for i in range(n):
        pid = f"p{i // images_per_patient:04d}"
        rows.append(
            {
                "case_id": f"c{i:05d}",
                "shard": i // shard_size,
                "index": i % shard_size,
                "split": split,
                "patient_id": pid,
                "study_id": f"{pid}-s{(i % images_per_patient) // 2}",
                "site": f"site{i % 2}",
                "sex": "",
                "age": np.nan,
                "report": "",
                "has_mask": False,
                "source": "synthetic",
                "orig_shape": str([size] * spatial_dims),
                "orig_spacing": str([1.0] * spatial_dims),
            }
        )
    writer.write_manifest(pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    writer.write_summary(
        Summary(
            n_cases=n,
            image_shape=[1] + [size] * spatial_dims,
            image_dtype="uint8",
            spatial_dims=spatial_dims,
            n_shards=(n + shard_size - 1) // shard_size,
            shard_size=shard_size,
            counts={"split": {split: n}},
            source="medfm.train.synthetic",
        )
    )
    return root
