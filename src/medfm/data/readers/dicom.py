"""DICOM: single files (2D or multi-frame) and series folders, through pydicom.

Values: raw stored values by default, with Rescale Slope/Intercept (or a Modality LUT) applied when present
(float32, e.g. CT in HU). MONOCHROME1 is inverted so that higher always means brighter.
``window=True`` applies the VOI window / LUT and returns float32 in [0, 1]; otherwise the window
is only recorded in meta (in the returned value space).
Identifiers never enter meta unless ``keep_identifiers=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfm.data.deid import dicom_identifiers
from medfm.data.readers.common import apply_nan_policy, check_file, check_voxels, exc_text, sniff
from medfm.data.sample import Sample
from medfm.errors import InputError

_VIDEO_HINT = "video transfer syntaxes (MPEG/HEVC) are not supported; export the frames as images"


def _pydicom():
    import pydicom

    return pydicom


def dcmread(path: str | Path, header_only: bool = False) -> Any:
    """pydicom.dcmread with every failure turned into an InputError naming the file."""
    pydicom = _pydicom()
    p = check_file(path)
    force = sniff(p) == "dicom"  # raw datasets without the 128-byte preamble are still DICOM
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p, stop_before_pixels=header_only, force=force, defer_size=None)
    except pydicom.errors.InvalidDicomError:
        raise InputError(p, "not a DICOM file (no 'DICM' marker and no recognisable DICOM header)") from None
    except Exception as e:  # pydicom raises many types on truncated/corrupt headers
        raise InputError(p, f"truncated or corrupt DICOM header ({exc_text(e)})") from None
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


def find(ds: Any, keyword: str, default: Any = None) -> Any:
    """An attribute at top level, else inside the enhanced multi-frame shared functional groups."""
    if keyword in ds:
        return ds.get(keyword)
    for group in ds.get("SharedFunctionalGroupsSequence", None) or []:
        for elem in group:
            if elem.VR == "SQ":
                for item in elem.value:
                    if keyword in item:
                        return item.get(keyword)
    return default


def _floats(value: Any) -> list[float] | None:
    if value is None or value == "":
        return None
    seq = value if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]
    try:
        return [float(v) for v in seq]
    except (TypeError, ValueError):
        return None


def pixel_spacing(ds: Any) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm = (sy, sx), from PixelSpacing or ImagerPixelSpacing."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = _floats(find(ds, kw))
        if v and len(v) == 2 and all(s > 0 for s in v):
            return float(v[0]), float(v[1])
    return None


def spacing_note(ds: Any) -> str:
    """Why pixel_spacing(ds) found nothing usable, as a note ending in the fallback used."""
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        raw = find(ds, kw)
        if raw is None or raw == "":
            continue
        v = _floats(raw)
        if v is None or len(v) != 2:
            return f"{kw} {raw!s} is not two numbers; spacing set to 1.0"
        bad = next(s for s in v if not s > 0)  # pixel_spacing refused it, so one value is not positive
        return f"{kw} {bad:g} is not positive; spacing set to 1.0"
    return "no PixelSpacing in header; spacing set to 1.0"


def _age_years(value: Any) -> int | None:
    """DICOM AS ('060Y', '006M') to whole years, capped at 90 (HIPAA safe harbour groups older ages)."""
    s = str(value or "").strip().upper()
    if len(s) < 2 or not s[:-1].isdigit():
        return None
    n, unit = int(s[:-1]), s[-1]
    years = {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}.get(unit)
    return None if years is None else min(years, 90)


def safe_meta(ds: Any) -> dict[str, Any]:
    """Non-identifying header fields worth keeping: acquisition, geometry and pixel encoding."""
    ts = ds.file_meta.TransferSyntaxUID
    sop = ds.get("SOPClassUID")
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": str(ds.get("Modality", "") or ""),
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "rows": int(ds.get("Rows", 0) or 0),
        "cols": int(ds.get("Columns", 0) or 0),
        "frames": int(ds.get("NumberOfFrames", 1) or 1),
        "samples_per_pixel": int(ds.get("SamplesPerPixel", 1) or 1),
        "bits_allocated": int(ds.get("BitsAllocated", 0) or 0),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "pixel_representation": int(ds.get("PixelRepresentation", 0) or 0),
        "transfer_syntax": getattr(ts, "name", str(ts)),
        "sop_class": getattr(sop, "name", "") if sop else "",
    }
    for key, kw in (
        ("manufacturer", "Manufacturer"),
        ("manufacturer_model", "ManufacturerModelName"),
        ("body_part", "BodyPartExamined"),
        ("view_position", "ViewPosition"),
        ("laterality", "ImageLaterality"),
        ("patient_sex", "PatientSex"),
    ):
        v = ds.get(kw)
        if v not in (None, ""):
            meta[key] = str(v)
    age = _age_years(ds.get("PatientAge"))
    if age is not None:
        meta["patient_age"] = age
    for key, kw in (("slice_thickness", "SliceThickness"), ("field_strength", "MagneticFieldStrength")):
        v = _floats(find(ds, kw))
        if v:
            meta[key] = v[0]
    iop = _floats(find(ds, "ImageOrientationPatient"))
    if iop and len(iop) == 6:
        meta["image_orientation"] = iop
    return meta


def _check_pixels_present(ds: Any, path: Path) -> None:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        kind = f" ({sop.name})" if sop is not None and getattr(sop, "name", "") else ""
        raise InputError(path, f"DICOM has no pixel data{kind}: not an image object")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise InputError(path, f"DICOM header has invalid image size Rows={rows} Columns={cols}")


def _check_length(ds: Any, path: Path) -> None:
    """Native (uncompressed) pixel data must hold rows*cols*frames*samples values: catches truncation."""
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed or "PixelData" not in ds:
        return
    bits = int(ds.get("BitsAllocated", 8) or 8)
    n = (
        int(ds.Rows)
        * int(ds.Columns)
        * int(ds.get("NumberOfFrames", 1) or 1)
        * int(ds.get("SamplesPerPixel", 1) or 1)
    )
    expected = (n * bits + 7) // 8
    if ds.get("PhotometricInterpretation", "") in ("YBR_FULL_422",):
        expected = expected * 2 // 3
    have = len(ds.PixelData)
    if have < expected:
        raise InputError(path, f"truncated DICOM: pixel data has {have} of {expected} bytes")


def _decode(ds: Any, path: Path) -> np.ndarray:
    from pydicom.pixels import get_decoder

    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed:
        try:
            dec = get_decoder(ts)
        except NotImplementedError:
            hint = _VIDEO_HINT if "MPEG" in ts.name or "HEVC" in ts.name else "pydicom has no decoder for it"
            raise InputError(path, f"cannot decode transfer syntax '{ts.name}' ({ts}): {hint}") from None
        if not dec.is_available:
            missing = "; ".join(dec.missing_dependencies) or "a codec plugin"
            raise InputError(
                path,
                f"cannot decode transfer syntax '{ts.name}' ({ts}): missing codec, install one of: {missing}",
            )
    else:
        _check_length(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(ds.pixel_array)
    except Exception as e:
        raise InputError(path, f"cannot decode pixel data ({ts.name}): {exc_text(e)}") from None


def _stored_range(ds: Any) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _has_modality_lut(ds: Any) -> bool:
    return any(find(ds, k) is not None for k in ("RescaleSlope", "RescaleIntercept", "ModalityLUTSequence"))


def _modality(arr: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds).astype(np.float32)
    slope = float(find(ds, "RescaleSlope", 1.0) or 1.0)
    icept = float(find(ds, "RescaleIntercept", 0.0) or 0.0)
    return (arr.astype(np.float32) * np.float32(slope) + np.float32(icept)).astype(np.float32)


def values(raw: np.ndarray, ds: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Grey stored values -> modality values (rescaled), MONOCHROME1 inverted. Returns (values, info)."""
    info: dict[str, Any] = {"rescaled": _has_modality_lut(ds), "inverted": False}
    lo, hi = _stored_range(ds)
    if info["rescaled"]:
        vals = _modality(raw, ds)
        ends = _modality(np.array([lo, hi]), ds)
        lo_v, hi_v = float(ends.min()), float(ends.max())
    else:
        vals, lo_v, hi_v = raw, float(lo), float(hi)
    info["range"] = (lo_v, hi_v)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        # reflect about the centre of the representable range so the values stay in range and dtype
        if vals.dtype.kind in "ui":
            vals = (np.int64(lo + hi) - vals.astype(np.int64)).astype(vals.dtype)
        else:
            vals = (np.float32(lo_v + hi_v) - vals).astype(np.float32)
        info["inverted"] = True
    return vals, info


def window_of(ds: Any, info: dict[str, Any]) -> dict[str, Any] | None:
    """The first VOI window of the header, expressed in the returned value space (after any inversion)."""
    c, w = _floats(find(ds, "WindowCenter")), _floats(find(ds, "WindowWidth"))
    if not c or not w:
        return {"lut": True} if "VOILUTSequence" in ds else None
    center, width = c[0], w[0]
    if info.get("inverted"):
        lo_v, hi_v = info["range"]
        center = lo_v + hi_v - center
    fn = str(find(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return {"center": center, "width": width, "function": fn}


def apply_window(vals: np.ndarray, ds: Any, info: dict[str, Any]) -> np.ndarray:
    """VOI LUT or window (PS3.3 C.11.2.1.2) to float32 in [0, 1], higher = brighter."""
    if info.get("inverted"):  # the window is defined on the un-inverted values
        lo_v, hi_v = info["range"]
        vals = (lo_v + hi_v) - vals.astype(np.float64)
    x = vals.astype(np.float64)
    c, w = _floats(find(ds, "WindowCenter")), _floats(find(ds, "WindowWidth"))
    if c and w:
        center, width = c[0], max(w[0], 1.0)
        fn = str(find(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if fn == "SIGMOID":
            y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        elif fn == "LINEAR_EXACT":
            y = np.clip((x - center) / width + 0.5, 0.0, 1.0)
        else:
            y = np.clip((x - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)
    elif "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi

        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        y = apply_voi(x.astype(np.int64) if np.all(np.mod(x, 1) == 0) else x, ds).astype(np.float64)
        y = y / float(2**bits - 1)
    else:  # nothing in the header: stretch the data range
        lo, hi = float(np.min(x)), float(np.max(x))
        y = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    y = y.astype(np.float32)
    return 1.0 - y if info.get("inverted") else y


def _colour(raw: np.ndarray, ds: Any) -> np.ndarray:
    """Colour DICOM to (..., 3) RGB: palette colour expanded; YBR was converted by pydicom already."""
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return apply_color_lut(raw, ds)
    return raw


def _axcodes(row: np.ndarray, col: np.ndarray, normal: np.ndarray) -> str:
    """Anatomical code of the (W, H, D) axes from LPS direction cosines, e.g. 'LPS' for axial HFS."""
    from nibabel.orientations import aff2axcodes

    ras = np.eye(4)
    flip = np.array([-1.0, -1.0, 1.0])  # DICOM patient space is LPS, codes are RAS-based
    ras[:3, 0], ras[:3, 1], ras[:3, 2] = row * flip, col * flip, normal * flip
    return "".join(aff2axcodes(ras))


def ras_affine(
    row: np.ndarray,
    col: np.ndarray,
    normal: np.ndarray,
    origin: np.ndarray,
    spacing_dhw: tuple[float, float, float],
) -> np.ndarray:
    """4x4 affine from voxel (x=W, y=H, z=D) indices to RAS millimetres."""
    dz, dy, dx = spacing_dhw
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dx, col * dy, normal * dz, origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _frame_positions(ds: Any) -> list[list[float]] | None:
    groups = ds.get("PerFrameFunctionalGroupsSequence", None)
    if not groups:
        return None
    out = []
    for g in groups:
        try:
            out.append([float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient])
        except (AttributeError, IndexError, KeyError):
            return None
    return out


def probe_dicom(path: str | Path) -> dict[str, Any]:
    """Shape (channel-first), spacing and key fields from the header, without decoding pixels."""
    p = check_file(path)
    ds = dcmread(p, header_only=True)
    meta = safe_meta(ds)
    c, f = meta["samples_per_pixel"], meta["frames"]
    ps = pixel_spacing(ds) or (1.0, 1.0)
    shape = (c, f, meta["rows"], meta["cols"]) if f > 1 else (c, meta["rows"], meta["cols"])
    spacing = ps if f == 1 else (float((_floats(find(ds, "SpacingBetweenSlices")) or [1.0])[0]), *ps)
    return {
        "format": "dicom",
        "shape": shape,
        "spacing": spacing,
        "modality": meta["modality"],
        "photometric": meta["photometric"],
        "transfer_syntax": meta["transfer_syntax"],
    }


def read_dicom(
    path: str | Path,
    window: bool = False,
    keep_identifiers: bool = False,
    max_voxels: int | None = None,
    nan_policy: str = "error",
    **_: Any,
) -> Sample:
    """One DICOM file: (C, H, W) for a single frame, (C, D=frames, H, W) for multi-frame."""
    p = check_file(path)
    ds = dcmread(p)
    _check_pixels_present(ds, p)
    meta = safe_meta(ds)
    check_voxels(p, (meta["frames"], meta["rows"], meta["cols"], meta["samples_per_pixel"]), max_voxels)
    raw = _decode(ds, p)
    frames = meta["frames"]
    if meta["samples_per_pixel"] > 1 or meta["photometric"].upper() == "PALETTE COLOR":
        rgb = _colour(raw, ds)
        arr = np.moveaxis(rgb, -1, 0)  # (3, H, W) or (3, F, H, W)
        if frames > 1 and arr.ndim == 3:
            arr = arr[:, None]
        meta["photometric_out"] = "RGB"
    else:
        vals, info = values(raw, ds)
        w = window_of(ds, info)
        if w:
            meta["window"] = w
        meta["rescaled"], meta["inverted"] = info["rescaled"], info["inverted"]
        if window:
            vals = apply_window(vals, ds, info)
            meta["windowed"] = True
        arr = vals[None]
    arr = np.ascontiguousarray(arr)
    ps = pixel_spacing(ds)
    if ps is None:
        meta["note_spacing"] = spacing_note(ds)
        ps = (1.0, 1.0)
    orientation = None
    if arr.ndim == 4:
        dz, iop, pos = 1.0, meta.get("image_orientation"), _frame_positions(ds)
        if iop and pos and len(pos) == frames and frames > 1:
            row, col = np.array(iop[:3]), np.array(iop[3:])
            normal = np.cross(row, col)
            d = np.array(pos) @ normal
            dz = float(np.median(np.abs(np.diff(d)))) or 1.0
            orientation = _axcodes(row, col, normal)
        else:
            sb = _floats(find(ds, "SpacingBetweenSlices")) or _floats(find(ds, "SliceThickness"))
            dz = float(sb[0]) if sb and sb[0] > 0 else 1.0
        spacing: tuple[float, ...] = (dz, *ps)
    else:
        spacing = ps
    arr = apply_nan_policy(p, arr, nan_policy, meta)
    if keep_identifiers:
        meta["identifiers"] = dicom_identifiers(ds)
    return Sample(
        array=arr, spacing=tuple(float(s) for s in spacing), orientation=orientation, meta=meta, path=str(p)
    )
