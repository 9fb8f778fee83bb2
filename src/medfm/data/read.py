"""Read any supported medical image into a Sample, choosing the reader from the file's content.

    from medfm.data.read import read, read_any, read_series, probe
    s = read("scan.dcm", window=True)          # DICOM, PNG/JPEG/TIFF, NIfTI, NPZ/NPY
    v = read_any("study/series_folder")         # a folder is read as a DICOM series
    info = probe("ct.nii.gz")                   # format, shape, spacing from the header only

Content decides (magic bytes), the extension is only a fallback; a mismatch is noted in
``meta["note_extension"]``, not fatal. Every problem with an input raises ``InputError(path, problem)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medfm.data.readers import FORMAT_READER, PROBES, READERS
from medfm.data.readers.common import check_file, describe_unknown, exc_text, extension_format, sniff
from medfm.data.readers.dicom_series import list_series
from medfm.data.readers.dicom_series import read_series as _read_series
from medfm.data.readers.npz import read_medmnist_npz
from medfm.data.sample import Sample
from medfm.errors import ConfigError, InputError, MedfmError

# Options any reader understands; others are accepted only by the readers named.
OPTIONS = {
    "max_voxels": "all: refuse images with more voxels than this (default 2**28), checked before decoding",
    "nan_policy": "all: 'error' (default) refuses NaN/Inf voxels, 'zero' replaces them with 0",
    "grey": "image: convert colour to one luminance channel",
    "palette_index": "image: return palette indices of a palette PNG (label maps) instead of colours",
    "window": "dicom: apply the VOI window/LUT, output float32 in [0, 1] (default: raw modality values)",
    "keep_identifiers": "dicom: put patient identifiers under meta['identifiers'] (default: never)",
    "series_uid": "dicom series: which series of a folder (default: the largest)",
    "recursive": "dicom series: also look in sub-folders",
    "canonical": "nifti (default True) / dicom series (default False): reorient to RAS",
    "key": "npz: name of the image array",
    "layout": "npz: 'auto', 'hw', 'hwc', 'chw', 'dhw' or 'cdhw'",
    "split": "npz: MedMNIST split of the image to read",
    "index": "npz: MedMNIST index of the image to read",
}


def _check_options(opts: dict[str, Any]) -> None:
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown read option(s) {unknown}; known: {sorted(OPTIONS)}")


def detect_format(path: str | Path) -> tuple[str, str | None]:
    """(content format, extension format). Raises InputError when the content is not a supported image."""
    p = check_file(path)
    fmt = sniff(p)
    ext = extension_format(p)
    if fmt is None or fmt not in FORMAT_READER:
        raise InputError(p, describe_unknown(p))
    return fmt, ext


def _guard(p: Path, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
    """Last line of defence: a library error on a bad file becomes one InputError line.

    MEDFM_DEBUG=1 re-raises the original exception for debugging.
    """
    try:
        return fn(*args, **kw)
    except MedfmError:
        raise
    except MemoryError:
        raise InputError(p, f"{what} is too large to fit in memory") from None
    except Exception as e:
        if os.environ.get("MEDFM_DEBUG"):
            raise
        raise InputError(p, f"unreadable {what} ({exc_text(e)})") from None


def read(path: str | Path, **opts: Any) -> Sample:
    """Read one image file (DICOM, PNG, JPEG, TIFF, BMP, NIfTI, NPZ, NPY) into a channel-first Sample."""
    _check_options(opts)
    p = Path(path)
    if p.is_dir():
        raise InputError(p, "is a folder; use read_any() or read_series() to read a DICOM series")
    fmt, ext = detect_format(p)
    sample = _guard(p, f"{fmt.upper()} file", READERS.create, FORMAT_READER[fmt], path=p, **opts)
    sample.meta.setdefault("format", fmt)
    if ext is not None and ext != fmt and {ext, fmt} != {"npz", "npy"}:
        sample.meta["note_extension"] = (
            f"extension says {ext.upper()} but content is {fmt.upper()}; read as {fmt}"
        )
    return sample


def read_series(folder: str | Path, **opts: Any) -> Sample:
    """Read a DICOM series folder into (1, D, H, W); see medfm.data.readers.dicom_series.read_series."""
    _check_options(opts)
    p = Path(folder)
    return _guard(p, "DICOM series", _read_series, p, **opts)


def read_any(path: str | Path, **opts: Any) -> Sample:
    """A folder is read as a DICOM series, a file by its content."""
    return read_series(path, **opts) if Path(path).is_dir() else read(path, **opts)


def probe(path: str | Path, **opts: Any) -> dict[str, Any]:
    """Format, channel-first shape and spacing from headers only (no pixel decoding) — for fast listings."""
    p = Path(path)
    if p.is_dir():
        return _guard(p, "DICOM series", _probe_series, p)
    fmt, ext = detect_format(p)
    reader = FORMAT_READER[fmt]
    info = _guard(p, f"{fmt.upper()} file", PROBES.create, reader, path=p, **opts)
    info.setdefault("format", fmt)
    if ext is not None and ext != fmt and {ext, fmt} != {"npz", "npy"}:
        info["note_extension"] = f"extension says {ext.upper()} but content is {fmt.upper()}"
    info["path"] = str(p)
    return info


def _probe_series(folder: Path) -> dict[str, Any]:
    from medfm.data.readers.dicom import pixel_spacing
    from medfm.data.readers.dicom_series import _order, _scan

    root, groups = _scan(folder)
    items = max(groups.values(), key=len)
    meta: dict[str, Any] = {}
    items, dz, _, _ = _order(items, root, meta)
    ds = items[0][1]
    ps = pixel_spacing(ds) or (1.0, 1.0)
    return {
        "format": "dicom_series",
        "path": str(root),
        "series_in_folder": len(groups),
        "shape": (1, len(items), int(ds.Rows), int(ds.Columns)),
        "spacing": (float(dz), *map(float, ps)),
        "modality": str(ds.get("Modality", "") or ""),
        **meta,
    }


__all__ = [
    "OPTIONS",
    "detect_format",
    "list_series",
    "probe",
    "read",
    "read_any",
    "read_medmnist_npz",
    "read_series",
]
