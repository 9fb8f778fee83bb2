"""Image-report pairs (CLIP training and the vision-language tasks): a prepared dataset or a CSV/Parquet
manifest, and the reading of raw image files the way a run's training images were prepared.

Both give the same items: ``image`` float tensor (C, H, W) or (C, D, H, W) in [0, 1] at the requested size,
``text`` (report), ``case_id``, ``patient_id`` and, when the data has labels, ``label`` (float multi-hot).
Prepared datasets (``medfm data prepare``) are the fast path; a manifest is read image by image (and cached),
which is fine for the few hundred to few thousand pairs these commands are used on directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medfm.errors import InputError


def resize_image(img: torch.Tensor, size: int | tuple[int, ...] | None) -> torch.Tensor:
    """Resize a (C, *spatial) tensor to ``size`` per spatial axis (no-op if it already fits or size=None)."""
    if size is None:
        return img
    nd = img.ndim - 1
    target = tuple(size) if isinstance(size, (tuple, list)) else (int(size),) * nd
    if tuple(img.shape[1:]) == target:
        return img
    mode = "bilinear" if nd == 2 else "trilinear"
    return F.interpolate(img[None].float(), size=target, mode=mode, align_corners=False)[0]


def read_normalized(path: str | Path, in_chans: int = 1) -> np.ndarray:
    """An image file as float32 (C, H, W) in [0, 1], scaled the way `medfm data prepare` scales it."""
    from medfm.data.preprocess import make_spec, normalise
    from medfm.data.readers.image import read_image

    sample = read_image(path, grey=in_chans == 1)
    try:
        return normalise(sample, make_spec())
    except ValueError as e:  # NaN / infinite pixels
        raise InputError(path, str(e)) from None


def fit_channels(img: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Grey -> RGB tower or the reverse: the channel mean, repeated ``in_chans`` times."""
    if img.shape[0] == in_chans:
        return img
    return img.mean(0, keepdim=True).expand(in_chans, *img.shape[1:]).contiguous()


def input_spec(preprocessing: dict[str, Any] | None, img_size: Any, in_chans: int) -> dict[str, Any]:
    """The preprocessing a run's raw inputs replay: the one recorded from its training store, else (old
    runs, runs trained on a manifest) the prepared-store defaults at the run's image size."""
    from medfm.data.preprocess import make_spec

    if preprocessing:
        return preprocessing
    size = img_size[-1] if isinstance(img_size, (tuple, list)) else img_size
    return make_spec(size=int(size), channels=int(in_chans))


def read_input(path: str | Path, spec: dict[str, Any], img_size: Any, in_chans: int) -> torch.Tensor:
    """A raw image file as the model sees it: `medfm.data.preprocess.load_input` (what prepare stores),
    then the same resize / channel fit ImageTextDataset applies to a prepared case."""
    from medfm.data.preprocess import load_input

    return fit_channels(resize_image(load_input(path, spec), img_size), in_chans)


def model_input(path: str | Path, model: Any) -> torch.Tensor:
    """A raw image file prepared for a CLIP ``model`` with the preprocessing its run recorded."""
    cfg = model.cfg
    spec = input_spec(getattr(model, "preprocessing", None), cfg.img_size, cfg.in_chans)
    return read_input(path, spec, cfg.img_size, cfg.in_chans)


class ImageTextDataset(Dataset):
    """Image-report pairs with optional multi-hot labels; see the module docstring for the item layout."""

    def __init__(
        self,
        path: str | Path,
        split: str | list[str] | None = None,
        img_size: Any = None,
        in_chans: int = 1,
        label_columns: list[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.img_size = img_size
        self.in_chans = int(in_chans)
        if not self.path.exists():
            raise InputError(
                self.path, "no such dataset (expected a prepared dataset folder or a CSV manifest)"
            )
        if self.path.is_dir() and (self.path / "summary.json").is_file():
            self._init_prepared(split)
        elif self.path.is_file():
            self._init_manifest(split, label_columns)
        elif self.path.is_dir() and (self.path / "manifest.csv").is_file():
            self.path = self.path / "manifest.csv"
            self._init_manifest(split, label_columns)
        else:
            raise InputError(self.path, "not a prepared dataset (no summary.json) nor a CSV/Parquet manifest")
        if len(self) == 0:
            raise InputError(self.path, f"no cases{f' in split {split}' if split else ''}")

    # ---- sources --------------------------------------------------------------------------------------
    def _init_prepared(self, split: str | list[str] | None) -> None:
        from medfm.data.store import PreparedDataset

        self.prepared: PreparedDataset | None = PreparedDataset(self.path, split=split)
        m = self.prepared.manifest
        self.label_names: list[str] = list(self.prepared.label_columns)
        self.texts = (
            [t if isinstance(t, str) else "" for t in m["report"].tolist()]
            if "report" in m
            else [""] * len(m)
        )
        self.case_ids = [str(c) for c in m["case_id"]]
        self.patient_ids = [str(p) for p in m["patient_id"]] if "patient_id" in m else list(self.case_ids)
        lab = self.prepared.labels()
        self._labels = None if lab is None else (lab if lab.ndim == 2 else lab[:, None]).astype(np.float32)
        self._images: list[str] = []

    def _init_manifest(self, split: str | list[str] | None, label_columns: list[str] | None) -> None:
        from medfm.data.manifest import load_manifest

        self.prepared = None
        man = load_manifest(self.path, label_cols=label_columns)
        df = man.df
        if split is not None:
            splits = [split] if isinstance(split, str) else list(split)
            df = df[df["split"].astype(str).isin(splits)]
            if len(df) == 0:
                raise InputError(self.path, f"no cases in split {splits} (is there a 'split' column?)")
        df = df.reset_index(drop=True)
        self.label_names = list(man.label_columns)
        self.texts = [t if isinstance(t, str) else "" for t in df["report"].tolist()]
        self.case_ids = [str(c) for c in df["case_id"]]
        pid = df["patient_id"].astype(str).tolist()
        self.patient_ids = [p if p and p != "nan" else c for p, c in zip(pid, self.case_ids)]
        self._images = [str(p) for p in df["image"]]
        if self.label_names:
            lab = df[self.label_names].to_numpy(dtype=np.float32)
            self._labels = lab
        else:
            self._labels = None
        self._cache: dict[int, torch.Tensor] = {}

    # ---- items ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.texts)

    def labels(self) -> np.ndarray | None:
        """(n, k) float labels (-1 = unknown) or None."""
        return self._labels

    def _read(self, i: int) -> torch.Tensor:
        if i in self._cache:
            return self._cache[i]
        img = resize_image(torch.from_numpy(read_normalized(self._images[i], self.in_chans)), self.img_size)
        self._cache[i] = img
        return img

    def image(self, i: int) -> torch.Tensor:
        if self.prepared is not None:  # the image only: the full item would also build mask and label
            from medfm.data.preprocess import to_tensor

            img = resize_image(to_tensor(self.prepared.image_array(i)), self.img_size)
        else:
            img = self._read(i)
        return fit_channels(img, self.in_chans)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {
            "image": self.image(i),
            "text": self.texts[i],
            "case_id": self.case_ids[i],
            "patient_id": self.patient_ids[i],
            "index": i,
        }
        if self._labels is not None:
            item["label"] = torch.from_numpy(self._labels[i])
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in items]),
        "text": [it["text"] for it in items],
        "case_id": [it["case_id"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
    if "label" in items[0]:
        out["label"] = torch.stack([it["label"] for it in items])
    return out
