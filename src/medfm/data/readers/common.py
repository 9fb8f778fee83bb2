"""Checks every reader shares: file sanity, size limits before decoding, NaN/Inf policy, format sniffing."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medfm.errors import ConfigError, InputError

# Default ceiling on voxels per image (2^28 ~ 268 M, e.g. 645^3 or 16k x 16k): far above real scans,
# far below what a forged header can claim. Configurable per call with max_voxels=.
DEFAULT_MAX_VOXELS = 2**28
NAN_POLICIES = ("error", "zero")

# extension -> format, used only when the content does not say (and to note mismatches)
EXTENSION_FORMATS = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".bmp": "bmp",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".ima": "dicom",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".npz": "npz",
    ".npy": "npy",
}


def extension_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return "nifti"
    return EXTENSION_FORMATS.get(path.suffix.lower())


def check_file(path: str | Path) -> Path:
    """The path exists, is a regular file and is not empty."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "file not found")
    if p.is_dir():
        raise InputError(p, "is a folder, not a file (use read_series / read_any for a DICOM series folder)")
    if p.stat().st_size == 0:
        raise InputError(p, "empty file (0 bytes)")
    return p


def check_voxels(path: str | Path, shape: tuple[int, ...], max_voxels: int | None) -> None:
    """Refuse absurd dimensions from the header, before any pixel is decoded (decompression bombs)."""
    dims = tuple(int(s) for s in shape)
    if any(s <= 0 for s in dims):
        raise InputError(path, f"header declares an empty or negative dimension {dims}")
    limit = DEFAULT_MAX_VOXELS if max_voxels is None else int(max_voxels)
    n = int(np.prod(np.asarray(dims, dtype=np.float64)))
    if n > limit:
        raise InputError(
            path,
            f"header declares {' x '.join(map(str, dims))} = {n} voxels, over the limit "
            f"{limit} (possible decompression bomb; raise max_voxels= if genuine)",
        )


def check_nan_policy(nan_policy: str) -> None:
    if nan_policy not in NAN_POLICIES:
        raise ConfigError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")


def apply_nan_policy(
    path: str | Path, array: np.ndarray, nan_policy: str, meta: dict[str, Any]
) -> np.ndarray:
    """Non-finite voxels are an error by default; nan_policy="zero" replaces them and counts them in meta."""
    check_nan_policy(nan_policy)
    if not np.issubdtype(array.dtype, np.floating):
        return array
    bad = ~np.isfinite(array)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return array
    if nan_policy == "error":
        n_nan = int(np.isnan(array).sum())
        raise InputError(
            path,
            f"contains {n_nan} NaN and {n_bad - n_nan} Inf voxels "
            "(pass nan_policy='zero' to replace them by 0)",
        )
    array = np.where(bad, np.zeros((), dtype=array.dtype), array)
    meta["nonfinite_replaced"] = n_bad
    return array


def _nifti_magic(head: bytes) -> bool:
    if len(head) < 348:
        return False
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348 and head[344:347] in (b"n+1", b"ni1"):
            return True
        if size == 540 and head[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def _gunzip_head(path: Path, n: int) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read(n)
    except (OSError, EOFError, zlib.error):
        return b""


def sniff(path: str | Path) -> str | None:
    """The format the file's first bytes say ("png", "jpeg", "dicom", "nifti", "npz", ...), or None."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(560)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"BM") and len(head) > 26:
        return "bmp"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "npz"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\x1f\x8b"):
        return "nifti" if _nifti_magic(_gunzip_head(p, 560)) else "gzip"
    if _nifti_magic(head):
        return "nifti"
    # DICOM written without the 128-byte preamble ("raw" dataset): starts with a group 0008 or 0002 tag
    if len(head) >= 8 and head[:2] in (b"\x08\x00", b"\x02\x00") and head[3:4] == b"\x00":
        return "dicom"
    return None


def describe_unknown(path: Path) -> str:
    """A one-line guess at what a non-image file is, for the error message."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"%PDF"):
        kind = "a PDF document"
    elif head.startswith(b"\x1f\x8b"):
        kind = "gzip data that is not NIfTI"
    elif b"\x00" not in head:
        try:
            head.decode("utf-8")
            kind = "a text file"
        except UnicodeDecodeError:
            kind = "unrecognised binary data"
    else:
        kind = "unrecognised binary data"
    ext = extension_format(path)
    if ext:
        return f"not a {ext.upper()} file: content is {kind}"
    return f"not a supported image format: content is {kind} (supported: PNG, JPEG, TIFF, DICOM, NIfTI, NPZ)"


def exc_text(e: BaseException, limit: int = 200) -> str:
    """A library exception as one short line (errors shown to users are one line)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
