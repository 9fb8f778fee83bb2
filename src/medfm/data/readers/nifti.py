"""NIfTI-1/2 (.nii, .nii.gz) through nibabel, reoriented to the closest canonical RAS.

nibabel's array is (x, y, z[, t]); medfm's contract is channel-first (C, D, H, W) = (C, z, y, x), so the
array is transposed and the zooms reversed. A 4th dimension becomes channels. Integer data (label maps)
keep their integer dtype unless the header asks for scaling.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medfm.data.readers.common import (
    apply_nan_policy,
    check_file,
    check_voxels,
    exc_text,
    extension_format,
)
from medfm.data.sample import Sample
from medfm.errors import InputError


def _load(p: Path) -> Any:
    """nibabel image with lazy data; files whose name does not say NIfTI are loaded from bytes."""
    import nibabel as nib

    try:
        if extension_format(p) == "nifti":
            return nib.load(str(p))
        raw = p.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        cls = nib.Nifti2Image if int.from_bytes(raw[:4], "little") == 540 else nib.Nifti1Image
        return cls.from_bytes(raw)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise InputError(p, f"truncated or corrupt NIfTI header ({exc_text(e)})") from None
    except Exception as e:  # nibabel's ImageFileError and friends
        raise InputError(p, f"not a readable NIfTI file ({exc_text(e)})") from None


def affine_problem(affine: np.ndarray) -> str | None:
    """Why a voxel-to-world affine cannot orient the volume (zero, singular or non-finite), else None."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(a).all():
        return "has NaN/Inf entries"
    if not a.any():
        return "is all zeros"
    scale = np.linalg.norm(a, axis=0)
    if scale.min() <= 1e-6 * max(float(scale.max()), 1e-12) or abs(np.linalg.det(a)) <= 1e-12:
        return "is singular (an axis has zero length or two axes coincide)"
    return None


def probe_nifti(path: str | Path) -> dict[str, Any]:
    """Shape (C, D, H, W) and spacing from the header (no voxel decoding, no reorientation)."""
    p = check_file(path)
    img = _load(p)
    shape = tuple(int(s) for s in img.shape)
    zooms = [float(z) for z in img.header.get_zooms()]
    c = shape[3] if len(shape) > 3 else 1
    spatial = (shape + (1, 1, 1))[:3]
    info: dict[str, Any] = {
        "format": "nifti",
        "shape": (c, spatial[2], spatial[1], spatial[0]),
        "spacing": (zooms[2] if len(zooms) > 2 else 1.0, zooms[1], zooms[0]),
        "dtype": str(img.get_data_dtype()),
    }
    bad = affine_problem(img.affine)
    if bad:  # probe reports, read refuses
        info["note_affine"] = f"affine {bad}: read() will refuse this file"
    return info


def read_nifti(
    path: str | Path,
    canonical: bool = True,
    max_voxels: int | None = None,
    nan_policy: str = "error",
    **_: Any,
) -> Sample:
    """Read a NIfTI volume as (C, D, H, W) with spacing (sz, sy, sx) mm and orientation "RAS"."""
    import nibabel as nib

    p = check_file(path)
    img = _load(p)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2 or len(shape) > 5:
        raise InputError(p, f"unsupported NIfTI dimensionality {shape}")
    check_voxels(p, shape, max_voxels)
    bad = affine_problem(img.affine)
    if bad:
        # Refused rather than read with an identity: orientation and spacing would be invented, and an
        # image and its mask could then be silently misaligned.
        raise InputError(
            p, f"NIfTI affine (sform/qform) {bad}: orientation and voxel spacing unknown; fix the header"
        )
    if len(shape) == 5:  # (x, y, z, 1, c) vectors/tensors: fold the last two into channels
        img = nib.Nifti1Image(np.asanyarray(img.dataobj).reshape(*shape[:3], -1), img.affine, img.header)
    elif len(shape) == 2:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., None], img.affine, img.header)
    meta: dict[str, Any] = {
        "format": "nifti",
        "orig_shape": list(shape),
        "orig_orientation": "".join(nib.aff2axcodes(img.affine)),
    }
    if canonical:
        img = nib.as_closest_canonical(img)
    try:
        data = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise InputError(p, f"truncated or corrupt NIfTI voxel data ({exc_text(e)})") from None
    if data.ndim == 3:
        data = data[..., None]
    arr = np.ascontiguousarray(np.transpose(data, (3, 2, 1, 0)))  # (x, y, z, c) -> (c, z, y, x)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    arr = apply_nan_policy(p, arr, nan_policy, meta)
    z = [float(v) for v in img.header.get_zooms()[:3]]
    meta["dtype"] = str(arr.dtype)
    meta["affine"] = np.asarray(img.affine).tolist()
    orientation = "".join(nib.aff2axcodes(img.affine))
    return Sample(array=arr, spacing=(z[2], z[1], z[0]), orientation=orientation, meta=meta, path=str(p))
