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


@dataclass
class SegPairs:
    images: torch.Tensor  # (N, C, *S) float32 in [0, 1], at training resolution
    masks: torch.Tensor  # (N, *S) int64 label maps, at training resolution
    native_masks: list[torch.Tensor]  # per case (*S_native) int64
    spacing: list[tuple[float, ...]]  # per case, mm per pixel of the native grid
    case_ids: list[str]
    sources: list[str] = field(default_factory=list)
    affines: list[Any] = field(default_factory=list)  # NIfTI affines (None for 2D pictures)

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
        )


def read_array(path: Path, is_mask: bool = False) -> tuple[np.ndarray, tuple[float, ...], Any]:
    """(array channel-first for images / plain for masks, spacing, affine or None) of a PNG/JPEG/NIfTI/NPY."""
    if not path.is_file():
        raise InputError(path, "no such file")
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(str(path))
            arr = np.asarray(img.dataobj)
            if arr.ndim == 4:
                arr = arr[..., 0]
            # nibabel gives (x, y, z); medfm arrays are (D, H, W) = (z, y, x).
            arr = np.ascontiguousarray(arr.transpose(2, 1, 0))
            sx, sy, sz = (float(v) for v in img.header.get_zooms()[:3])
            return (arr if is_mask else arr[None]), (sz, sy, sx), img.affine
        if name.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
            return (
                (arr if is_mask or arr.ndim == 4 else arr[None]),
                (1.0,) * (arr.ndim - (0 if is_mask else 0)),
                None,
            )
        from PIL import Image

        with Image.open(path) as im:
            # 16-bit PNGs (12-bit detectors) keep their range; colour/palette pictures become grey.
            arr = np.asarray(im) if im.mode in ("I;16", "I;16B", "I", "F") else np.asarray(im.convert("L"))
        return (arr if is_mask else arr[None]), (1.0, 1.0), None
    except InputError:
        raise
    except Exception as e:  # unreadable / truncated file: one line naming it
        raise InputError(path, f"cannot read ({type(e).__name__}: {e})") from None


def to_unit(arr: np.ndarray) -> np.ndarray:
    """Scale intensities to [0, 1] (uint8 by /255, others by robust min-max)."""
    a = arr.astype(np.float32)
    if arr.dtype == np.uint8:
        return a / 255.0
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.clip((a - lo) / max(float(hi - lo), 1e-6), 0, 1).astype(np.float32)


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
) -> SegPairs:
    """Image/mask pairs of a prepared dataset directory or a CSV manifest file/folder."""
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
    imgs, masks, native, spacing, ids, srcs, affs = [], [], [], [], [], [], []
    for _, row in df.iterrows():
        ip, mp = csv.parent / str(row["image"]), csv.parent / str(row["mask"])
        arr, sp, aff = read_array(ip)
        marr, _, _ = read_array(mp, is_mask=True)
        if marr.shape != arr.shape[1:]:
            raise InputError(mp, f"mask shape {marr.shape} differs from image shape {arr.shape[1:]}")
        m = torch.from_numpy(mask_labels(marr))
        img, mr = resize_pair(torch.from_numpy(to_unit(arr)), m, size)
        imgs.append(img)
        masks.append(mr)
        native.append(m)
        spacing.append(sp)
        ids.append(Path(str(row["image"])).name.split(".")[0])
        srcs.append(str(ip))
        affs.append(aff)
    return SegPairs(torch.stack(imgs), torch.stack(masks), native, spacing, ids, srcs, affs)


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
    return SegPairs(torch.stack(imgs), torch.stack(masks), native, spacing, ids, [], [None] * len(rows))


class CropDataset(Dataset):
    """Random crops (padded when smaller; half centred on foreground) + flips + intensity jitter.

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
        self.images, self.masks, self.patch, self.augment = pairs.images, pairs.masks, tuple(patch), augment
        self.flip = flip
        self.fg_prob = fg_prob
        self.length = length or len(pairs)
        self.gen = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = self.gen
        j = int(rng.integers(len(self.images))) if self.length != len(self.images) else i
        img, m = self.images[j], self.masks[j]
        pads = [max(0, p - s) for p, s in zip(self.patch, img.shape[1:])]
        if any(pads):
            pad = [v for p in reversed(pads) for v in (p // 2, p - p // 2)]
            img, m = F.pad(img, pad), F.pad(m, pad)
        starts = [int(rng.integers(s - p + 1)) for p, s in zip(self.patch, img.shape[1:])]
        if self.fg_prob and rng.random() < self.fg_prob and bool(m.any()):
            # centre on a random foreground voxel (small structures are otherwise rarely seen in a crop)
            fg = torch.nonzero(m)
            c = fg[int(rng.integers(len(fg)))].tolist()
            starts = [min(max(0, ci - p // 2), s - p) for ci, p, s in zip(c, self.patch, img.shape[1:])]
        sl = tuple(slice(a, a + p) for a, p in zip(starts, self.patch))
        img, m = img[(slice(None),) + sl], m[sl]
        if self.augment:
            if self.flip and rng.random() < 0.5:
                img, m = img.flip(-1), m.flip(-1)
            img = (img * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.05, 0.05))).clamp(0, 1)
        return {"image": img.contiguous(), "mask": m.contiguous()}
