"""Preprocessing replay: the one path from a decoded `Sample` to what `medfm data prepare` stores.

`prepare` records the spec it used in the store's ``summary.json`` (key ``preprocessing``); a model trained on
that store keeps it in its run config, and inference on raw files replays it with `load_input`, so a raw
PNG/DICOM/NIfTI reaches the model exactly as its prepared twin did (same normalisation, resize, dtype
quantisation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medfm.data import normalize as nz
from medfm.data.sample import Sample
from medfm.errors import InputError

SPEC_VERSION = 1
# What a store written before specs were recorded used (PrepareConfig defaults of that time).
DEFAULT_SPEC: dict[str, Any] = {
    "version": SPEC_VERSION,
    "size": 224,
    "resize_mode": "pad",
    "spacing": [1.5, 1.5, 1.5],
    "volume_shape": [96, 96, 96],
    "window": [-1000.0, 1000.0],
    "channels": 1,
    "dtype": "auto",
    "modality": None,  # None: per-case guess (guess_modality); else forced for every case
    "mask_labels": None,
}


def make_spec(**values: Any) -> dict[str, Any]:
    """A complete, JSON-ready spec: DEFAULT_SPEC overridden by `values` (tuples become lists)."""
    spec = dict(DEFAULT_SPEC)
    unknown = set(values) - set(spec)
    if unknown:
        raise ValueError(f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(spec)}")
    for k, v in values.items():
        spec[k] = list(v) if isinstance(v, tuple) else v
    spec["version"] = SPEC_VERSION
    return spec


def preprocessing_of(store_root: str | Path) -> dict[str, Any]:
    """The spec prepare used for `store_root`, from its summary.json (old stores: rebuilt from `settings`)."""
    from medfm.data.store import read_summary

    summary = read_summary(store_root)
    if isinstance(summary.get("preprocessing"), dict):
        return make_spec(**{k: v for k, v in summary["preprocessing"].items() if k in DEFAULT_SPEC})
    settings = summary.get("settings") or {}
    values = {k: settings[k] for k in DEFAULT_SPEC if k in settings and k not in ("modality", "version")}
    # Old stores record the *requested* modality ("auto") in settings; the resolved one is top-level.
    mod = settings.get("modality")
    if mod in (None, "auto"):
        mod = summary.get("modality") if isinstance(summary.get("modality"), str) else None
    values["modality"] = mod
    return make_spec(**values)


def modality_for(sample: Sample, spec: dict[str, Any]) -> str:
    """The modality whose normalisation applies to `sample`: the spec's forced one, else a guess."""
    arr = np.asarray(sample.array)
    return spec.get("modality") or nz.guess_modality(arr, sample.meta or {}, arr.ndim - 1)


def _storage_dtype(spec: dict[str, Any], dims: int) -> str:
    d = spec.get("dtype", "auto")
    return d if d != "auto" else ("uint8" if dims == 2 else "float16")


def _mask_labels(mask: Sample | np.ndarray, sample: Sample, spec: dict[str, Any]) -> np.ndarray:
    arr = np.asarray(sample.array)
    m = np.asarray(mask.array if isinstance(mask, Sample) else mask)
    m = m[0] if m.ndim == arr.ndim else m
    if m.shape != arr.shape[1:]:
        where = mask.path if isinstance(mask, Sample) and mask.path else sample.path
        raise InputError(where, f"mask shape {m.shape} does not match image shape {arr.shape[1:]}")
    return nz.mask_to_labels(m, spec.get("mask_labels"))


def preprocess_sample(
    sample: Sample, spec: dict[str, Any], mask: Sample | np.ndarray | None = None
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Normalise, convert channels, resize/resample and quantise `sample` exactly as prepare stores it.

    Returns the stored image array (uint8 or float16, (C, H, W) / (C, D, H, W)); when `mask` is given,
    returns ``(image, mask)`` with the mask as the stored uint8 label map.
    """
    arr = np.asarray(sample.array)
    dims = arr.ndim - 1
    if dims not in (2, 3):
        raise InputError(sample.path, f"unsupported array shape {arr.shape} (need (C, H, W) or (C, D, H, W))")
    img = nz.normalize_intensity(arr, modality_for(sample, spec), window=tuple(spec["window"]))
    img = nz.to_channels(img, int(spec["channels"]))
    labels = _mask_labels(mask, sample, spec) if mask is not None else None
    if dims == 2:
        img = nz.resize_2d(img, int(spec["size"]), spec["resize_mode"])
        if labels is not None:
            labels = nz.resize_2d(labels, int(spec["size"]), spec["resize_mode"], is_mask=True)
    else:
        spacing = tuple(float(x) for x in sample.spacing)
        target = tuple(float(x) for x in spec["spacing"])
        shape = tuple(int(x) for x in spec["volume_shape"])
        img = nz.crop_or_pad(nz.resample_3d(img, spacing, target), shape)
        if labels is not None:
            labels = nz.crop_or_pad(nz.resample_3d(labels, spacing, target, is_mask=True), shape)
    stored = nz.to_storage(img, _storage_dtype(spec, dims))
    return stored if labels is None else (stored, labels)


def to_tensor(stored: np.ndarray) -> Any:
    """A stored array as the float32 tensor PreparedDataset yields (uint8 -> value / 255)."""
    import torch

    img = torch.from_numpy(np.asarray(stored).astype(np.float32))
    return img / 255.0 if stored.dtype == np.uint8 else img


def load_input(path: str | Path, spec: dict[str, Any]) -> Any:
    """Read a raw file (image, DICOM series folder or ``file.npz::key/i``) and preprocess it like prepare.

    Returns a float32 tensor (C, H, W) / (C, D, H, W) equal to ``PreparedDataset(store)[i]["image"]`` for the
    same file prepared with `spec`.
    """
    from medfm.data.prepare import read_ref

    ref = str(path)
    if "::" not in ref:
        ref = str(Path(ref).expanduser())
    stored = preprocess_sample(read_ref(ref), spec)
    assert isinstance(stored, np.ndarray)  # no mask given
    return to_tensor(stored)
