"""Preprocessing replay: the one path from a decoded `Sample` to what `medfm data prepare` stores.

`prepare` records the spec it used in the store's ``summary.json`` (key ``preprocessing``); a model trained on
that store keeps it in its run config, and inference on raw files replays it with `load_input`, so a raw
PNG/DICOM/NIfTI reaches the model exactly as its prepared twin did (same normalisation, resize, dtype
quantisation).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
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
    # "auto": per case, see normalisation_for; "legacy": by modality alone (stores written before this key);
    # "window" / "percentile" / "minmax": forced for every case.
    "normalisation": "auto",
}
PERCENTILES = nz.PERCENTILES
NORMALISATIONS = ("auto", "legacy", *nz.SCALINGS)
_PICTURES = ("png", "jpeg", "tiff", "bmp")  # never HU: display pictures
_NOTE = "note_normalisation"


def make_spec(**values: Any) -> dict[str, Any]:
    """A complete, JSON-ready spec: DEFAULT_SPEC overridden by `values` (tuples become lists)."""
    spec = dict(DEFAULT_SPEC)
    unknown = set(values) - set(spec)
    if unknown:
        raise ValueError(f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(spec)}")
    for k, v in values.items():
        spec[k] = list(v) if isinstance(v, tuple) else v
    spec["version"] = SPEC_VERSION
    if spec["normalisation"] not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {spec['normalisation']!r}; known: {NORMALISATIONS}")
    return spec


def preprocessing_of(store_root: str | Path) -> dict[str, Any]:
    """The spec prepare used for `store_root`, from its summary.json (old stores: rebuilt from `settings`)."""
    from medfm.data.store import read_summary

    summary = read_summary(store_root)
    if isinstance(summary.get("preprocessing"), dict):
        # A store written before the key existed was normalised by modality alone: replay exactly that.
        recorded = {k: v for k, v in summary["preprocessing"].items() if k in DEFAULT_SPEC}
        return make_spec(**{"normalisation": "legacy", **recorded})
    settings = summary.get("settings") or {}
    values = {k: settings[k] for k in DEFAULT_SPEC if k in settings and k not in ("modality", "version")}
    values["normalisation"] = "legacy"
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


def _method_name(method: str, spec: dict[str, Any]) -> str:
    if method == "window":
        lo, hi = (float(v) for v in spec["window"])
        return f"window {lo:g}..{hi:g} HU"
    return f"percentile {PERCENTILES[0]:g}-{PERCENTILES[1]:g}" if method == "percentile" else "min-max"


def _not_hu(arr: np.ndarray, meta: dict[str, Any]) -> str | None:
    """Why the values are not CT Hounsfield units, or None when they look like HU."""
    fmt = str(meta.get("format", "")).lower()
    if fmt in _PICTURES:
        return f"{fmt.upper()} source, not HU"
    if arr.dtype in (np.uint8, np.bool_):
        return "uint8 source, not HU"  # MedMNIST npz, 8-bit exports, masks
    if meta.get("windowed"):
        return "values already windowed to 0..1, not HU"
    if arr.size and float(arr.min()) >= -50.0:
        return "no values below -50 (air and fat are negative in HU), not HU"
    return None


def normalisation_for(sample: Sample, spec: dict[str, Any]) -> dict[str, str]:
    """How `sample`'s intensities are scaled to [0, 1] and why: {"method", "normalisation", "reason"}.

    The HU window applies only to CT whose values look like HU (not PNG/JPEG/TIFF, not uint8 arrays, some
    values below -50); anything else is scaled min-max (8-bit data: already display-scaled) or by robust
    percentiles. A "warning" key says when the values do not fit the modality.
    """
    arr = np.asarray(sample.array)
    meta = sample.meta or {}
    mod = modality_for(sample, spec)
    policy = spec.get("normalisation", "auto")
    if policy in nz.SCALINGS:
        method, reason, warning = policy, "forced by the preprocessing spec", ""
    elif policy == "legacy":
        method = nz.modality_method(mod, arr.dtype)
        reason, warning = f"{mod} (rule of stores prepared before normalisation was recorded)", ""
    else:
        method, reason, warning = _auto(arr, meta, mod)
    out = {"method": method, "normalisation": _method_name(method, spec), "reason": reason}
    if warning:
        out["warning"] = f"{warning}; {out['normalisation']} used"
    return out


def _auto(arr: np.ndarray, meta: dict[str, Any], mod: str) -> tuple[str, str, str]:
    """(method, reason, warning) of the "auto" policy."""
    eight_bit = arr.dtype in (np.uint8, np.bool_)
    span = f"{float(arr.min()):g}..{float(arr.max()):g} ({arr.dtype})" if arr.size else "empty"
    if mod == "ct":
        not_hu = _not_hu(arr, meta)
        if not_hu is None:
            return "window", "CT with values in HU", ""
        return ("minmax" if eight_bit else "percentile"), not_hu, f"modality ct but values {span} are not HU"
    if eight_bit:
        return "minmax", "8-bit source, already display-scaled", ""
    fmt = str(meta.get("format", "")).lower()
    warning = ""
    if arr.size and float(arr.min()) < -500 and fmt not in _PICTURES:
        warning = f"modality {mod} but values {span} look like CT HU (pass --modality ct if they are)"
    if mod == "mr":
        return "percentile", "MR has no absolute intensity scale", warning
    return "percentile", f"{arr.dtype} source, robust to outliers", warning


def normalise(sample: Sample, spec: dict[str, Any]) -> np.ndarray:
    """`sample`'s array scaled to [0, 1] float32 as prepare does; records what was done in sample.meta.

    ``meta["note_normalisation"]`` says which normalisation and why (prepare copies notes and warnings into
    the manifest's ``reader_notes``; normalisation_record tallies them for summary.json).
    """
    rec = normalisation_for(sample, spec)
    if sample.meta is None:
        sample.meta = {}
    sample.meta[_NOTE] = f"{rec['normalisation']} ({rec['reason']})"
    warnings = sample.meta.setdefault("warnings", [])
    if "warning" in rec and rec["warning"] not in warnings:
        warnings.append(rec["warning"])
    return nz.scale_intensity(np.asarray(sample.array), rec["method"], tuple(spec["window"]), PERCENTILES)


_NOTE_RE = re.compile(re.escape(_NOTE) + r": (.+?) \((.*?)\)(?=; |$)")


def normalisation_record(spec: dict[str, Any], reader_notes: Iterable[str]) -> dict[str, Any]:
    """`spec` plus ``normalisation_applied``: [{"normalisation", "reason", "cases"}], most cases first.

    Written into summary.json "preprocessing" so a reader of the summary sees what was done and why;
    preprocessing_of ignores it (replay re-decides per case with the same rule).
    """
    counts: Counter[tuple[str, str]] = Counter()
    for notes in reader_notes:
        counts.update(_NOTE_RE.findall(str(notes or "")))
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))  # most cases first, then by name
    applied = [{"normalisation": name, "reason": reason, "cases": n} for (name, reason), n in ordered]
    return dict(spec, normalisation_applied=applied)


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
    img = nz.to_channels(normalise(sample, spec), int(spec["channels"]))
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
    from medfm.data.refs import read_ref

    ref = str(path)
    if "::" not in ref:
        ref = str(Path(ref).expanduser())
    stored = preprocess_sample(read_ref(ref), spec)
    assert isinstance(stored, np.ndarray)  # no mask given
    return to_tensor(stored)
