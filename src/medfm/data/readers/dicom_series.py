"""A DICOM series folder -> one volume (1, D, H, W), slices ordered along the slice normal.

Order: ImagePositionPatient projected on the normal (row x column direction cosines); InstanceNumber only when
positions are missing. Slice spacing comes from the positions (SliceThickness is not the spacing: slices may
overlap or have gaps). Duplicate positions are dropped and counted; gaps (missing slices) are counted.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medfm.data.deid import dicom_identifiers
from medfm.data.readers.common import apply_nan_policy, check_voxels, sniff
from medfm.data.readers.dicom import (
    _axcodes,
    _check_pixels_present,
    _decode,
    _floats,
    apply_window,
    dcmread,
    find,
    pixel_spacing,
    ras_affine,
    safe_meta,
    spacing_note,
    values,
    window_of,
)
from medfm.data.sample import Sample
from medfm.errors import InputError

_ORIENT_TOL = 1e-3  # direction cosines of one series agree to this
_DUP_TOL = 1e-3  # mm: positions closer than this are the same slice


def _dicom_files(folder: Path, recursive: bool) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = []
    for p in sorted(it):
        if p.is_file() and not p.name.startswith(".") and p.stat().st_size > 0:
            try:
                if sniff(p) == "dicom":
                    files.append(p)
            except OSError:
                continue
    return files


def _scan(folder: str | Path, recursive: bool = False) -> tuple[Path, dict[str, list[tuple[Path, Any]]]]:
    root = Path(folder)
    if not root.is_dir():
        raise InputError(root, "not a folder (a DICOM series is read from a folder of slice files)")
    files = _dicom_files(root, recursive)
    if not files:
        raise InputError(root, "no DICOM files in folder")
    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    for f in files:
        ds = dcmread(f, header_only=True)
        if int(ds.get("Rows", 0) or 0) == 0:  # reports, presentation states, ... share series folders
            continue
        groups[str(ds.get("SeriesInstanceUID", "") or "")].append((f, ds))
    if not groups:
        raise InputError(root, "folder has DICOM files but none holds an image")
    return root, groups


def list_series(folder: str | Path, recursive: bool = False) -> list[dict[str, Any]]:
    """The image series in a folder, largest first: uid, number of files, modality, description, size.

    The UIDs are for choosing with ``read_series(series_uid=...)``; they are identifiers, do not store them.
    """
    _, groups = _scan(folder, recursive)
    out = []
    for uid, items in groups.items():
        ds = items[0][1]
        out.append(
            {
                "series_uid": uid,
                "files": len(items),
                "modality": str(ds.get("Modality", "") or ""),
                "description": str(ds.get("SeriesDescription", "") or ""),
                "rows": int(ds.get("Rows", 0) or 0),
                "cols": int(ds.get("Columns", 0) or 0),
            }
        )
    return sorted(out, key=lambda d: -d["files"])


def _order(
    items: list[tuple[Path, Any]], root: Path, meta: dict[str, Any]
) -> tuple[list[tuple[Path, Any]], float, np.ndarray | None, np.ndarray | None]:
    """Sorted slices, slice spacing, direction cosines (3, 3) rows=(row, col, normal), first position."""
    iops = [_floats(find(ds, "ImageOrientationPatient")) for _, ds in items]
    ipps = [_floats(find(ds, "ImagePositionPatient")) for _, ds in items]
    if all(o and len(o) == 6 for o in iops) and all(p and len(p) == 3 for p in ipps):
        ref = np.array(iops[0])
        n_bad = sum(np.abs(np.array(o) - ref).max() > _ORIENT_TOL for o in iops)
        if n_bad:
            raise InputError(
                root,
                f"series mixes slice orientations ({n_bad} of {len(items)} slices differ from the first); "
                "cannot stack into a volume",
            )
        row, col = ref[:3], ref[3:]
        normal = np.cross(row, col)
        d = np.array(ipps) @ normal
        order = np.argsort(d, kind="stable")
        items, d, ipps = [items[i] for i in order], d[order], [ipps[i] for i in order]
        keep = [0]
        for i in range(1, len(items)):
            if abs(d[i] - d[keep[-1]]) > _DUP_TOL:
                keep.append(i)
        if len(keep) < len(items):
            # A count, never a file name: names in hospital archives often carry the patient's name.
            n_dup = len(items) - len(keep)
            meta["duplicate_slices"] = n_dup
            meta.setdefault("warnings", []).append(
                f"{n_dup} of {len(items)} slices share a position with another slice (within {_DUP_TOL} mm); "
                "duplicates dropped, the first file (by name) at each position kept"
            )
        items, d = [items[i] for i in keep], d[keep]
        first = np.array(ipps[keep[0]])
        if len(items) < 2:
            sb = _floats(find(items[0][1], "SliceThickness"))
            return items, float(sb[0]) if sb else 1.0, np.stack([row, col, normal]), first
        diffs = np.diff(d)
        dz = float(np.median(diffs))
        gaps = diffs / dz
        missing = int(sum(round(g) - 1 for g in gaps if g > 1.5))
        if missing:
            meta["missing_slices"] = missing
            meta.setdefault("warnings", []).append(
                f"{missing} slice(s) missing: gaps in positions up to {diffs.max():.3g} mm "
                f"vs spacing {dz:.3g} mm"
            )
        elif np.abs(diffs - dz).max() > 0.01 * dz + 1e-3:
            meta.setdefault("warnings", []).append(
                f"irregular slice spacing {diffs.min():.4g}..{diffs.max():.4g} mm (median {dz:.4g} used)"
            )
        return items, dz, np.stack([row, col, normal]), first
    # no geometry: order by InstanceNumber; spacing from the header as the only hint
    meta.setdefault("warnings", []).append("no ImagePositionPatient/Orientation: ordered by InstanceNumber")
    items = sorted(items, key=lambda it: int(it[1].get("InstanceNumber", 0) or 0))
    nums = [int(ds.get("InstanceNumber", 0) or 0) for _, ds in items]
    if len(set(nums)) < len(nums):
        meta["duplicate_slices"] = len(nums) - len(set(nums))
        meta["warnings"].append(f"{meta['duplicate_slices']} duplicate InstanceNumber(s)")
    sb = _floats(find(items[0][1], "SpacingBetweenSlices")) or _floats(find(items[0][1], "SliceThickness"))
    return items, float(sb[0]) if sb and sb[0] > 0 else 1.0, None, None


def read_series(
    folder: str | Path,
    series_uid: str | None = None,
    window: bool = False,
    keep_identifiers: bool = False,
    max_voxels: int | None = None,
    nan_policy: str = "error",
    recursive: bool = False,
    canonical: bool = False,
    **_: Any,
) -> Sample:
    """All slices of one series in a folder as (1, D, H, W); orientation is the (W, H, D) axis code.

    series_uid: which series when the folder holds several (default: the one with most files).
    canonical: reorient to RAS like the NIfTI reader (default: keep the acquisition order).
    """
    root, groups = _scan(folder, recursive)
    meta: dict[str, Any] = {}
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(
                root,
                f"no series with the given series_uid; the folder holds {len(groups)} "
                "series (see medfm.data.read.list_series)",
            )
        items = groups[series_uid]
    else:
        sizes = sorted((len(v) for v in groups.values()), reverse=True)
        items = max(groups.values(), key=len)
        if len(groups) > 1:
            meta.setdefault("warnings", []).append(
                f"folder holds {len(groups)} series ({', '.join(map(str, sizes))} files); read the largest, "
                "pass series_uid= to choose"
            )
            meta["series_in_folder"] = len(groups)
    items, dz, dirs, first = _order(items, root, meta)
    ds0 = items[0][1]
    base = safe_meta(ds0)
    rows, cols = base["rows"], base["cols"]
    check_voxels(root, (len(items), rows, cols), max_voxels)
    slices, infos = [], []
    for f, hdr in items:
        if (int(hdr.get("Rows", 0)), int(hdr.get("Columns", 0))) != (rows, cols):
            raise InputError(
                f, f"slice size {hdr.get('Rows')}x{hdr.get('Columns')} differs from the series' {rows}x{cols}"
            )
        ds = dcmread(f)
        _check_pixels_present(ds, f)
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise InputError(f, "colour slices in a series are not supported")
        v, info = values(_decode(ds, f), ds)
        slices.append((v, ds, info))
        infos.append(info)
    rescaled = any(i["rescaled"] for i in infos)
    mid_v, mid_ds, mid_info = slices[len(slices) // 2]
    if window:
        vol = np.stack([apply_window(v, ds, i) for v, ds, i in slices])
        base["windowed"] = True
    else:
        vol = np.stack([v.astype(np.float32) if rescaled else v for v, _, _ in slices])
    w = window_of(mid_ds, mid_info)
    if w:
        base["window"] = w
    base.update(rescaled=rescaled, inverted=mid_info["inverted"], frames=len(items), slices=len(items))
    base.pop("slice_thickness", None)
    st = _floats(find(ds0, "SliceThickness"))
    if st:
        base["slice_thickness"] = st[0]  # recorded, but spacing comes from positions
    ps = pixel_spacing(ds0)
    if ps is None:
        meta["note_spacing"] = spacing_note(ds0)
        ps = (1.0, 1.0)
    spacing = (float(dz), float(ps[0]), float(ps[1]))
    orientation = None
    if dirs is not None:
        orientation = _axcodes(dirs[0], dirs[1], dirs[2])
        base["affine"] = ras_affine(dirs[0], dirs[1], dirs[2], first, spacing).tolist()
    base.update(meta)
    arr = vol[None]
    if canonical and dirs is not None:
        arr, spacing, orientation, base["affine"] = _to_ras(arr, np.array(base["affine"]))
    arr = apply_nan_policy(root, np.ascontiguousarray(arr), nan_policy, base)
    if keep_identifiers:
        base["identifiers"] = dicom_identifiers(ds0)
    return Sample(array=arr, spacing=spacing, orientation=orientation, meta=base, path=str(root))


def _to_ras(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, ...], str, list]:
    """Reorient (1, D, H, W) with its (x, y, z) affine to the closest RAS, as the NIfTI reader does."""
    import nibabel as nib

    img = nib.Nifti1Image(np.transpose(arr[0], (2, 1, 0)), affine)
    can = nib.as_closest_canonical(img)
    data = np.asarray(can.dataobj).transpose(2, 1, 0)[None]
    z = np.linalg.norm(np.asarray(can.affine)[:3, :3], axis=0)  # float64, unlike the header's float32 zooms
    return np.ascontiguousarray(data), (float(z[2]), float(z[1]), float(z[0])), "RAS", can.affine.tolist()
