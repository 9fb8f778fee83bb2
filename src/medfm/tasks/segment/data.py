"""Image + mask pairs for segmentation, from a prepared dataset or a CSV (image, mask[, split, site]).

Everything is loaded into memory: segmentation sets with labels are small (tens to thousands of cases),
and in-memory tensors make random crops cheap. Images are scaled to [0, 1]; 2D pairs are resized to
``size`` (bilinear image, nearest mask); the native-resolution masks are kept for evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medfm.errors import InputError
from medfm.train.augment import PairAugmentConfig, augment_pair


@dataclass
class SegPairs:
    images: torch.Tensor  # (N, C, *S) float32 in [0, 1], at training resolution
    masks: torch.Tensor  # (N, *S) int64 label maps, at training resolution
    native_masks: list[torch.Tensor]  # per case (*S_native) int64
    spacing: list[tuple[float, ...]]  # per case, mm per pixel of the native grid
    case_ids: list[str]
    sources: list[str] = field(default_factory=list)
    affines: list[Any] = field(default_factory=list)  # NIfTI affines (None for 2D pictures)
    spacing_known: list[bool] = field(default_factory=list)  # False: spacing is 1 per pixel (PNG, store)
    spec: dict[str, Any] | None = None  # the preprocessing the images went through (run configs record it)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: list[int]) -> SegPairs:
        return SegPairs(
            self.images[idx],
            self.masks[idx],
            [self.native_masks[i] for i in idx],
            [self.spacing[i] for i in idx],
            [self.case_ids[i] for i in idx],
            [self.sources[i] for i in idx] if self.sources else [],
            [self.affines[i] for i in idx] if self.affines else [],
            [self.spacing_known[i] for i in idx] if self.spacing_known else [],
            self.spec,
        )


def csv_spec(size: int | None) -> dict[str, Any]:
    """Preprocessing of image/mask manifests (no prepared store): prepare's defaults with a plain resize to
    the training size, so predictions map back onto each input's own grid by resizing."""
    from medfm.data.preprocess import make_spec

    return make_spec(size=int(size or 224), resize_mode="stretch")


def read_image(
    ref: str | Path, spec: dict[str, Any]
) -> tuple[torch.Tensor, tuple[float, ...], bool, Any, Any]:
    """(image tensor, spacing, spacing known, affine or None, Sample) of a raw file, through medfm's readers.

    2D images are exactly what ``medfm.data.preprocess.load_input(ref, spec)`` returns (what prepare would
    store). Volumes are normalised the same way but keep their own grid: dense 3D models run a sliding
    window and write masks aligned with the input's affine."""
    from medfm.data import normalize as nz
    from medfm.data.preprocess import load_input, normalise
    from medfm.data.refs import read_ref

    sample = read_ref(str(ref))
    arr = np.asarray(sample.array)
    known = bool(sample.meta.get("spacing_known", sample.meta.get("format") in ("dicom", "nifti")))
    affine = np.asarray(sample.meta["affine"]) if "affine" in sample.meta else None
    if arr.ndim == 3:
        return load_input(ref, spec), tuple(sample.spacing), known, affine, sample
    img = nz.to_channels(normalise(sample, spec), int(spec["channels"])).astype(np.float32)
    return torch.from_numpy(img), tuple(sample.spacing), known, affine, sample


def read_mask(ref: str | Path, spec: dict[str, Any] | None = None) -> torch.Tensor:
    """A mask file as an int64 label map (0/255 pictures -> 0/1), read through medfm's readers."""
    from medfm.data import normalize as nz
    from medfm.data.refs import read_ref

    m = np.asarray(read_ref(str(ref)).array)
    m = m[0] if m.shape[0] == 1 else m
    if m.ndim not in (2, 3):
        raise InputError(ref, f"a mask must be one label map, got shape {m.shape}")
    return torch.from_numpy(nz.mask_to_labels(m, (spec or {}).get("mask_labels")).astype(np.int64))


def mask_labels(mask: np.ndarray) -> np.ndarray:
    """0/255 picture masks -> 0/1; label maps kept as they are."""
    m = mask.astype(np.int64)
    vals = np.unique(m)
    if len(vals) <= 2 and vals.max(initial=0) == 255:
        return (m > 127).astype(np.int64)
    return m


def resize_pair(img: torch.Tensor, mask: torch.Tensor, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a 2D (C, H, W) image and its (H, W) mask to size x size; volumes are kept."""
    if size is None or img.ndim != 3 or tuple(img.shape[1:]) == (size, size):
        return img, mask
    img = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    return img, mask


def load_pairs(
    root: str | Path,
    split: str | None = None,
    site: str | None = None,
    size: int | None = None,
    limit: int | None = None,
    spec: dict[str, Any] | None = None,
) -> SegPairs:
    """Image/mask pairs of a prepared dataset directory or a CSV manifest file/folder.

    Raw files of a manifest are preprocessed with ``spec`` (a run's recorded ``config["preprocessing"]``;
    default ``csv_spec(size)``), so inference sees what training saw."""
    root = Path(root)
    if (root / "summary.json").is_file():
        return _from_prepared(root, split, site, size, limit)
    csv = root if root.suffix == ".csv" else root / "manifest.csv"
    if not csv.is_file():
        raise InputError(root, "not a prepared dataset (summary.json) or a folder with manifest.csv")
    import pandas as pd

    df = pd.read_csv(csv)
    for col in ("image", "mask"):
        if col not in df.columns:
            raise InputError(csv, f"manifest has no '{col}' column (columns: {', '.join(df.columns)})")
    if split is not None and "split" in df.columns:
        df = df[df["split"] == split]
    if site is not None and "site" in df.columns:
        df = df[df["site"] == site]
    if limit is not None:
        df = df.iloc[:limit]
    if len(df) == 0:
        raise InputError(csv, f"no cases with split={split!r} site={site!r}")
    spec = spec or csv_spec(size)
    imgs, masks, native, spacing, known, ids, srcs, affs = [], [], [], [], [], [], [], []
    for _, row in df.iterrows():
        ip, mp = csv.parent / str(row["image"]), csv.parent / str(row["mask"])
        img, sp, kn, aff, _ = read_image(ip, spec)
        m = read_mask(mp, spec)
        if img.ndim == 3 and spec["resize_mode"] != "stretch":
            # letterboxed / cropped like the run's prepared store: evaluate on that grid
            from medfm.data import normalize as nz

            m = torch.from_numpy(
                nz.resize_2d(m.numpy().astype(np.uint8), int(spec["size"]), spec["resize_mode"], is_mask=True)
            ).long()
        elif tuple(m.shape) != tuple(img.shape[1:]) and img.ndim == 4:
            raise InputError(
                mp, f"mask shape {tuple(m.shape)} differs from image shape {tuple(img.shape[1:])}"
            )
        img_r, mr = resize_pair(img, m, size)
        if img.ndim == 3 and tuple(mr.shape) != tuple(img_r.shape[1:]):
            mr = F.interpolate(m[None, None].float(), size=tuple(img_r.shape[1:]), mode="nearest")[
                0, 0
            ].long()
        imgs.append(img_r)
        masks.append(mr)
        native.append(m)
        spacing.append(sp)
        known.append(kn)
        ids.append(Path(str(row["image"])).name.split(".")[0])
        srcs.append(str(ip))
        affs.append(aff)
    return SegPairs(torch.stack(imgs), torch.stack(masks), native, spacing, ids, srcs, affs, known, spec)


def _from_prepared(
    root: Path, split: str | None, site: str | None, size: int | None, limit: int | None
) -> SegPairs:
    from medfm.data.store import PreparedDataset

    ds = PreparedDataset(root, split=split)
    rows = [
        i
        for i in range(len(ds))
        if bool(ds.manifest.iloc[i].get("has_mask", False))
        and (site is None or str(ds.manifest.iloc[i].get("site", "")) == site)
    ]
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise InputError(root, f"no cases with a mask in split={split!r} site={site!r}")
    imgs, masks, native, spacing, ids = [], [], [], [], []
    for i in rows:
        item = ds[i]
        img, m = resize_pair(item["image"], item["mask"], size)
        imgs.append(img)
        masks.append(m)
        native.append(item["mask"])
        spacing.append((1.0,) * (item["image"].ndim - 1))
        ids.append(item["case_id"])
    from medfm.data.preprocess import preprocessing_of

    return SegPairs(
        torch.stack(imgs),
        torch.stack(masks),
        native,
        spacing,
        ids,
        [],
        [None] * len(rows),
        [False] * len(rows),
        preprocessing_of(root),
    )


class CropDataset(Dataset):
    """Random training crops of the pairs through ``medfm.train.augment.augment_pair``: padded when smaller,
    ``fg_prob`` of them centred on foreground, then (with ``augment``) flips and intensity jitter.

    ``flip=False`` keeps left and right as they are (lateralised anatomy: on a chest X-ray the heart is on
    the image's right, and random mirroring makes the model under-segment the left lower lung)."""

    def __init__(
        self,
        pairs: SegPairs,
        patch: tuple[int, ...],
        augment: bool = True,
        length: int | None = None,
        seed: int = 0,
        fg_prob: float = 0.5,
        flip: bool = True,
    ) -> None:
        self.images, self.masks, self.patch = pairs.images, pairs.masks, tuple(patch)
        self.cfg = PairAugmentConfig(fg_prob=fg_prob, augment=augment, flip=flip)
        self.length = length or len(pairs)
        self.gen = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(self.gen.integers(len(self.images))) if self.length != len(self.images) else i
        img, m = augment_pair(self.images[j], self.masks[j], self.patch, self.gen, self.cfg)
        return {"image": img, "mask": m}
