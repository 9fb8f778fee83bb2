"""Recursive folder scan for `medfm data prepare FOLDER`: image files, DICOM series, and what was skipped.

Nothing found is dropped silently: a file that looks like an image but cannot be a case (a broken or looping
symbolic link, an .npz holding pickled Python objects) comes back in ``FolderScan.skipped`` with a one-line
reason, and the importer lists it in the manifest's ``bad_rows`` so prepare reports it.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".nii",
    ".nii.gz",
    ".dcm",
    ".npy",
    ".npz",
    ".mha",
    ".nrrd",
)
# Folders that hold label maps, not images, in a plain folder scan.
MASK_DIRS = {"masks", "mask", "labels", "labelstr", "labelsts", "segmentations", "seg"}
SERIES_REF = "::series/"  # "folder::series/k": the k-th image series (by UID order) of a folder


@dataclass
class FolderScan:
    """What a scan found: image files, DICOM series refs, and (path, reason) of everything skipped."""

    images: list[str] = field(default_factory=list)
    series: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def has_ext(p: Path, exts: tuple[str, ...]) -> bool:
    n = p.name.lower()
    return any(n.endswith(e) for e in exts)


def is_dicom_file(p: Path) -> bool:
    """DICOM by extension or by the 'DICM' magic at byte 128 (many archives have no extension)."""
    if p.suffix.lower() == ".dcm":
        return True
    if p.suffix:
        return False
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _series_groups(folder: Path, files: list[str]) -> tuple[list[list[str]], list[str]]:
    """Group a folder's DICOM files by SeriesInstanceUID: (multi-file series, single files).

    Files whose header cannot be read stay single files, so prepare reports them with their own error.
    """
    import pydicom

    groups: dict[str, list[str]] = {}
    singles = []
    for f in files:
        try:
            ds = pydicom.dcmread(
                folder / f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Rows"]
            )
            uid = str(ds.get("SeriesInstanceUID", "") or "")
        except Exception:  # noqa: BLE001 - a broken file is read (and reported) on its own
            uid = ""
        if uid:
            groups.setdefault(uid, []).append(f)
        else:
            singles.append(f)
    multi = [groups[u] for u in sorted(groups) if len(groups[u]) > 1]
    singles += [g[0] for g in groups.values() if len(g) == 1]
    return multi, sorted(singles)


def _link_problem(p: Path) -> str | None:
    """Why a symbolic link cannot be read (broken or looping), else None (not a link, or a good one)."""
    if not p.is_symlink():
        return None
    try:
        os.stat(p)
    except FileNotFoundError:
        return "broken symbolic link (its target does not exist); skipped"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (the link points back to itself); skipped"
        return f"unreadable symbolic link ({e.strerror}); skipped"
    return None


def _npz_problem(p: Path) -> str | None:
    """Why an .npz cannot be a case without unpickling (object arrays), from the member headers only."""
    from medfm.data.readers.npz import npz_headers
    from medfm.errors import InputError

    try:
        heads = npz_headers(p)
    except InputError:
        return None  # corrupt: kept as a case, so the reader reports its own precise error
    pickled = sorted(k for k, (_, dtype) in heads.items() if dtype.hasobject)
    if pickled:
        return (
            f"array '{pickled[0]}' holds pickled Python objects; refused (unpickling untrusted data could "
            "execute code)"
        )
    return None


def _image_like(p: Path) -> bool:
    return has_ext(p, IMAGE_EXTS) or not p.suffix  # no suffix: possibly DICOM


def _is_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _subfolders(d: Path, dirnames: list[str], root: str, scan: FolderScan) -> list[str]:
    """The sub-folders to descend into; a linked folder that loops back is listed as skipped."""
    here = os.path.realpath(d)
    keep = []
    for name in sorted(dirnames):
        if name.startswith(".") or name.lower() in MASK_DIRS:
            continue
        sub = d / name
        if sub.is_symlink():
            target = os.path.realpath(sub)
            if _is_inside(here, target):
                scan.skipped.append(
                    (str(sub), "symbolic link loop (points to a folder that contains it); not followed")
                )
                continue
            if _is_inside(target, root):  # scanned under its own name; twice would duplicate cases
                scan.skipped.append((str(sub), "symbolic link to a folder of the source; scanned once there"))
                continue
        keep.append(name)
    return keep


def scan_folder(root: str | Path) -> FolderScan:
    """Recursive scan (following linked folders that do not loop): image files and DICOM series refs.

    A folder whose DICOM files share one series is one volume (ref = the folder); a folder with several
    series gives ``folder::series/k`` refs; standalone DICOM files (e.g. radiographs) are single images.
    """
    scan = FolderScan()
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        d = Path(dirpath)
        dirnames[:] = _subfolders(d, dirnames, real_root, scan)
        files = []
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            problem = _link_problem(d / f)
            if problem is None and f.lower().endswith(".npz"):
                problem = _npz_problem(d / f)
            if problem is None:
                files.append(f)
            elif _image_like(d / f):
                scan.skipped.append((str(d / f), problem))
        dcm = [f for f in files if is_dicom_file(d / f)]
        multi, singles = _series_groups(d, dcm) if len(dcm) > 1 else ([], dcm)
        if len(multi) == 1:
            scan.series.append(str(d))
        else:
            scan.series += [f"{d}{SERIES_REF}{k}" for k in range(len(multi))]
        scan.images += [str(d / f) for f in singles]
        scan.images += [str(d / f) for f in files if f not in dcm and has_ext(d / f, IMAGE_EXTS)]
    scan.skipped.sort()
    return scan


def skipped_rows(scan: FolderScan) -> list[dict[str, object]]:
    """The scan's skipped files in the manifest's ``bad_rows`` format (row 0: not a manifest row)."""
    return [{"row": 0, "case_id": "", "error": f"{path}: {why}"} for path, why in scan.skipped]
