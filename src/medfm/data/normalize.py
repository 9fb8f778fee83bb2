"""Pure array functions used by `medfm data prepare`: intensity normalisation, resizing, resampling, dtype.

All functions take and return channel-first numpy arrays ((C, H, W) or (C, D, H, W)), matching
`medfm.data.sample.Sample.array`. Masks are label maps without a channel axis ((H, W) or (D, H, W)).
"""

from __future__ import annotations

import numpy as np

from medfm.errors import ConfigError

MODALITIES = ("xray", "ct", "mr", "us", "other")
# DICOM Modality codes -> medfm modality names (only those normalised differently matter).
_DICOM_MODALITY = {
    "CT": "ct",
    "MR": "mr",
    "CR": "xray",
    "DX": "xray",
    "DR": "xray",
    "RG": "xray",
    "MG": "xray",
    "US": "us",
    "PT": "other",
    "NM": "other",
    "OT": "other",
}


def canonical_modality(value: object) -> str | None:
    """Map a free modality string ("CT", "MRI", "x-ray", "DX", ...) to one of MODALITIES, or None."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    v = str(value).strip()
    if not v:
        return None
    if v.upper() in _DICOM_MODALITY:
        return _DICOM_MODALITY[v.upper()]
    low = v.lower().replace("-", "").replace(" ", "")
    aliases = {
        "xray": "xray",
        "cxr": "xray",
        "radiograph": "xray",
        "mri": "mr",
        "mr": "mr",
        "ct": "ct",
        "ultrasound": "us",
        "us": "us",
        "photo": "other",
        "other": "other",
    }
    return aliases.get(low)


def guess_modality(array: np.ndarray, meta: dict, spatial_dims: int) -> str:
    """Modality from reader metadata, else a cautious guess: HU-like negatives in 3D mean CT."""
    m = canonical_modality(meta.get("modality"))
    if m:
        return m
    if spatial_dims == 3:
        return "ct" if float(np.min(array)) < -500 else "mr"
    return "other"


SCALINGS = ("window", "percentile", "minmax")
CT_WINDOW = (-1000.0, 1000.0)  # default HU window: air to dense bone
PERCENTILES = (0.5, 99.5)  # robust range of the "percentile" scaling


def scale_intensity(
    array: np.ndarray,
    method: str,
    window: tuple[float, float] = CT_WINDOW,
    percentiles: tuple[float, float] = PERCENTILES,
) -> np.ndarray:
    """Scale intensities to [0, 1] float32: a fixed "window" (low, high), robust "percentile" or "minmax"."""
    a = np.asarray(array, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError("image has NaN or infinite values")
    if method == "window":
        lo, hi = float(window[0]), float(window[1])
    elif method == "percentile":
        lo, hi = (float(v) for v in np.percentile(a, percentiles))
    elif method == "minmax":
        lo, hi = float(a.min()), float(a.max())
    else:
        raise ConfigError(f"unknown intensity scaling {method!r}; known: {SCALINGS}")
    if hi <= lo:  # constant image: keep it (all zeros) rather than divide by zero
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def normalize_intensity(
    array: np.ndarray,
    modality: str,
    window: tuple[float, float] = CT_WINDOW,
    percentiles: tuple[float, float] = PERCENTILES,
) -> np.ndarray:
    """Scale intensities to [0, 1] float32 by modality alone (the rule of stores prepared before 2026-12).

    CT: the HU window, MR: percentiles, X-ray/US/other: min-max for 8-bit, percentiles otherwise. It trusts
    the modality: prepare uses medfm.data.preprocess.normalisation_for, which also checks the values are HU.
    """
    return scale_intensity(array, modality_method(modality, np.asarray(array).dtype), window, percentiles)


def modality_method(modality: str, dtype: np.dtype) -> str:
    """The scaling the modality alone picks: CT window, MR percentiles, 8-bit min-max, else percentiles."""
    if modality == "ct":
        return "window"
    return "percentile" if modality == "mr" or dtype != np.uint8 else "minmax"


def to_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """Make the channel count `channels`: RGB -> grey by mean, grey -> RGB by repetition, RGBA drops alpha."""
    c = array.shape[0]
    if c == channels:
        return array
    if c == 4:
        array, c = array[:3], 3
    if channels == 1 and c == 3:
        return array.mean(axis=0, keepdims=True, dtype=np.float32)
    if c == 1:
        return np.repeat(array, channels, axis=0)
    if c == channels:
        return array
    raise ValueError(f"cannot convert {c} channels to {channels}")


def _fit_shape(h: int, w: int, size: int, mode: str) -> tuple[int, int]:
    if mode == "stretch":
        return size, size
    scale = size / max(h, w) if mode == "pad" else size / min(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _center_crop_pad(a: np.ndarray, shape: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Center-crop or zero-pad the trailing len(shape) axes of `a` to `shape`."""
    lead = a.ndim - len(shape)
    out = np.full(a.shape[:lead] + tuple(shape), fill, dtype=a.dtype)
    src, dst = [slice(None)] * lead, [slice(None)] * lead
    for have, want in zip(a.shape[lead:], shape):
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(0, want))
        else:
            start = (want - have) // 2
            src.append(slice(0, have))
            dst.append(slice(start, start + have))
    out[tuple(dst)] = a[tuple(src)]
    return out


def resize_2d(array: np.ndarray, size: int, mode: str = "pad", is_mask: bool = False) -> np.ndarray:
    """Resize (C, H, W) or a (H, W) mask to size x size.

    mode "pad" keeps the whole image (longest side -> size, zero padding), "crop" fills the square (shortest
    side -> size, center crop), "stretch" ignores the aspect ratio. Images use antialiased bilinear
    interpolation (PIL), masks nearest neighbour so label values survive.
    """
    from PIL import Image

    if mode not in ("pad", "crop", "stretch"):
        raise ConfigError(f"resize mode must be pad, crop or stretch, not {mode!r}")
    planes = array[None] if is_mask else array
    h, w = planes.shape[-2:]
    nh, nw = _fit_shape(h, w, size, mode)
    out = np.empty((planes.shape[0], nh, nw), dtype=np.uint8 if is_mask else np.float32)
    for c in range(planes.shape[0]):
        if is_mask:
            im = Image.fromarray(planes[c].astype(np.uint8), mode="L")
            out[c] = np.asarray(im.resize((nw, nh), Image.Resampling.NEAREST))
        else:
            im = Image.fromarray(planes[c].astype(np.float32), mode="F")
            out[c] = np.asarray(im.resize((nw, nh), Image.Resampling.BILINEAR))
    out = _center_crop_pad(out, (size, size))
    return out[0] if is_mask else out


def resample_3d(
    array: np.ndarray, spacing: tuple[float, ...], target: tuple[float, float, float], is_mask: bool = False
) -> np.ndarray:
    """Resample (C, D, H, W) (or a (D, H, W) mask) from `spacing` to `target` spacing (mm, (z, y, x))."""
    from scipy import ndimage

    zoom = [float(s) / float(t) for s, t in zip(spacing, target)]
    if all(abs(z - 1.0) < 1e-3 for z in zoom):
        return array
    if is_mask:
        return ndimage.zoom(array, zoom, order=0, mode="nearest", grid_mode=True)
    return np.stack(
        [ndimage.zoom(ch.astype(np.float32), zoom, order=1, mode="nearest", grid_mode=True) for ch in array]
    )


def crop_or_pad(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Center-crop / zero-pad the spatial (trailing) axes to `shape`."""
    return _center_crop_pad(array, tuple(int(s) for s in shape))


def to_storage(array01: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] float -> stored dtype: uint8 (value * 255, rounded) or float16."""
    if dtype == "uint8":
        return np.round(np.clip(array01, 0, 1) * 255.0).astype(np.uint8)
    if dtype == "float16":
        return array01.astype(np.float16)
    raise ConfigError(f"--dtype must be uint8 or float16, not {dtype!r}")


def mask_to_labels(mask: np.ndarray, mapping: dict | None = None) -> np.ndarray:
    """A spatial mask array ((H, W) or (D, H, W), no channel axis) -> uint8 label map.

    0/255 (or 0/1) binary masks become 0/1; `mapping` ({"255": 1, ...} from dataset.json "mask_labels"
    value->label) relabels; otherwise integer labels 0..255 are kept.
    """
    m = np.asarray(mask)
    if mapping:
        out = np.zeros(m.shape, dtype=np.uint8)
        for value, label in mapping.items():
            out[m == float(value)] = int(label)
        return out
    values = np.unique(m)
    if values.size <= 2 and set(values.tolist()) <= {0, 255}:
        return (m > 127).astype(np.uint8)
    if not np.all(np.equal(np.mod(values, 1), 0)) or values.min() < 0 or values.max() > 255:
        raise ValueError(f"mask values must be integer labels 0..255, found {values[:5].tolist()}...")
    return m.astype(np.uint8)
