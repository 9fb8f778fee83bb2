"""Importers: turn a known public layout into a normalised Manifest that `medfm data prepare` consumes.

Use as ``medfm data prepare NAME:ARG`` (e.g. ``medmnist:breastmnist``, ``nifti:/data/Task01``) or give a path
and let `resolve_source` recognise the layout. A new layout is one decorated function::

    @IMPORTERS.register("mylayout")
    def mylayout(arg: str, **opts) -> Manifest: ...
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfm.data.folder_scan import (
    IMAGE_EXTS,
    SERIES_REF,
    FolderScan,
    is_dicom_file,
    scan_folder,
    skipped_rows,
)
from medfm.data.manifest import Manifest, from_dataframe, load_manifest, read_table
from medfm.errors import ConfigError, InputError
from medfm.registry import Registry

IMPORTERS: Registry[Manifest] = Registry("importer")

MANIFEST_NAMES = ("manifest.parquet", "manifest.csv", "manifest.tsv")


@IMPORTERS.register(
    "medmnist",
    help="MedMNIST npz by name (medmnist:breastmnist, medmnist:organmnist3d_64) or a local file "
    "(medmnist:/path/file.npz)",
)
def import_medmnist(arg: str, root: str | Path | None = None, download: bool = False, **_: Any) -> Manifest:
    """MedMNIST v2 subset (2D or 3D); labels from *_labels; the official train/val/test split is kept."""
    from medfm.data.medmnist import medmnist_manifest

    return medmnist_manifest(arg, root, download)


# ---------------------------------------------------------------------------------------- folder + CSV
def _looks_like(path: Path, needed: set[str]) -> bool:
    p = path / "manifest.csv" if path.is_dir() else path
    if not p.is_file() or p.suffix.lower() != ".csv":
        return False
    with open(p, encoding="utf-8", errors="replace") as f:
        header = {c.strip().lower() for c in f.readline().strip().split(",")}
    return needed <= header


@IMPORTERS.register("cxr_lung_seg", help="Shenzhen/Montgomery TB chest X-rays with lung masks (folder)")
def import_cxr_lung_seg(arg: str, **_: Any) -> Manifest:
    """manifest.csv with image, mask, site, tuberculosis, split; label = tuberculosis (binary)."""
    root = Path(arg).expanduser()
    m = load_manifest(
        root / "manifest.csv" if root.is_dir() else root,
        label_cols=["tuberculosis"],
        task="binary",
        modality="xray",
    )
    m.mask_labels = m.mask_labels or {"255": 1}
    return m


@IMPORTERS.register("covid_cxr_notes", help="COVID-19 chest X-rays with clinical notes (folder)")
def import_covid_cxr_notes(arg: str, **_: Any) -> Manifest:
    """manifest.csv with image, text, finding, patient_id, sex, age, view, location, license.

    The notes become ``report``, location becomes ``site``; label ``covid19`` = 1 when the finding names
    COVID-19, 0 for other findings, -1 (unlabelled) where the finding is still "todo".
    """
    root = Path(arg).expanduser()
    mpath = root / "manifest.csv" if root.is_dir() else root
    df = read_table(mpath)
    if "location" in df.columns and "site" not in df.columns:
        df = df.rename(columns={"location": "site"})
    if "finding" in df.columns:
        f = df["finding"].astype(str).str.strip()
        df["covid19"] = np.where(f.str.lower() == "todo", "", np.where(f.str.contains("COVID-19"), "1", "0"))
    labels = ["covid19"] if "covid19" in df.columns else []
    return from_dataframe(
        df,
        mpath.parent,
        label_columns=labels,
        task="binary" if labels else None,
        modality="xray",
        label_classes={"covid19": [0, 1]} if labels else None,
        source=str(mpath),
    )


# ------------------------------------------------------------------------------------------ folders
def dicom_patient_ids(paths: list[str]) -> tuple[list[str], list[str]]:
    """(PatientID, StudyInstanceUID) per DICOM file or series folder, from the first header only.

    They stay in memory: prepare replaces them by salted hashes before anything is written, so series of
    one patient stay in one split without the real ID reaching the dataset.
    """
    import pydicom

    pids, studies = [], []
    for p in paths:
        q = Path(p.split(SERIES_REF)[0])
        f = next((x for x in sorted(q.iterdir()) if is_dicom_file(x)), None) if q.is_dir() else q
        pid = study = ""
        if f is not None and is_dicom_file(f):
            try:
                ds = pydicom.dcmread(
                    f, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"]
                )
                pid, study = str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "") or "")
            except Exception:  # noqa: BLE001 - unreadable headers are reported when prepare reads the file
                pass
        pids.append(pid)
        studies.append(study)
    return pids, studies


def _paths_manifest(root: Path, paths: list[str], modality: str | None, scan: FolderScan) -> Manifest:
    """A manifest of scanned paths; files the scan skipped become bad rows (listed by prepare)."""
    df = pd.DataFrame({"image": paths})
    dcm = [SERIES_REF in p or Path(p).is_dir() or is_dicom_file(Path(p)) for p in paths]
    if any(dcm):
        pids, studies = dicom_patient_ids([p for p, d in zip(paths, dcm) if d])
        df["patient_id"], df["study_id"] = "", ""
        df.loc[dcm, "patient_id"] = pids
        df.loc[dcm, "study_id"] = studies
    m = from_dataframe(df, root, modality=modality, source=str(root))
    m.bad_rows = m.bad_rows + skipped_rows(scan)
    return m


@IMPORTERS.register("folder", help="any folder: every image file, DICOM series folders become volumes")
def import_folder(arg: str, modality: str | None = None, **_: Any) -> Manifest:
    """Recursive scan; no labels. Folders named masks/labels are skipped (they hold label maps)."""
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise InputError(root, "not a folder")
    scan = scan_folder(root)
    paths = sorted(scan.images + scan.series)
    if not paths:
        why = f"; skipped: {scan.skipped[0][0]}: {scan.skipped[0][1]}" if scan.skipped else ""
        raise InputError(
            root, f"no images found (looked for {', '.join(IMAGE_EXTS)} and DICOM series){why}"
        )
    return _paths_manifest(root, paths, modality, scan)


@IMPORTERS.register("dicom", help="DICOM folder tree: one case per series folder (or per single file)")
def import_dicom(arg: str, modality: str | None = None, **_: Any) -> Manifest:
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise InputError(root, "not a folder")
    scan = scan_folder(root)
    paths = sorted(scan.series + [p for p in scan.images if is_dicom_file(Path(p))])
    if not paths:
        raise InputError(root, "no DICOM files found")
    return _paths_manifest(root, paths, modality, scan)


def _strip_nii(name: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


@IMPORTERS.register("nifti", help="NIfTI image/label pairs: imagesTr/labelsTr (nnU-Net) or *_img/*_seg")
def import_nifti(arg: str, modality: str | None = None, **_: Any) -> Manifest:
    """nnU-Net layout: imagesTr/<case>_0000.nii.gz + labelsTr/<case>.nii.gz (imagesTs -> split test, no mask).

    Only channel 0000 is used when a case has several channels. Flat layout: <case>_img.nii.gz +
    <case>_seg.nii.gz (also _image/_label, _mask).
    """
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise InputError(root, "not a folder")
    rows = []
    info_modality = modality
    if (root / "imagesTr").is_dir():
        for sub, split in (("imagesTr", ""), ("imagesTs", "test")):
            d = root / sub
            if not d.is_dir():
                continue
            for f in sorted(d.iterdir()):
                stem = _strip_nii(f.name)
                if stem == f.name or f.name.startswith("."):
                    continue
                case = stem[:-5] if stem[-5:-4] == "_" and stem[-4:].isdigit() else stem
                if stem != case and not stem.endswith("_0000"):
                    continue
                mask = root / "labelsTr" / f"{case}{f.name[len(stem) :]}"
                rows.append(
                    {
                        "image": str(f),
                        "mask": str(mask) if (split == "" and mask.exists()) else "",
                        "case_id": case,
                        "split": split,
                    }
                )
        if info_modality is None and (root / "dataset.json").is_file():
            import json

            mods = (
                json.loads((root / "dataset.json").read_text()).get("modality")
                or json.loads((root / "dataset.json").read_text()).get("channel_names")
                or {}
            )
            first = mods.get("0") if isinstance(mods, dict) else None
            from medfm.data.normalize import canonical_modality

            info_modality = canonical_modality(first) or None
    else:
        img_suffixes, seg_suffixes = ("_img", "_image"), ("_seg", "_label", "_mask")
        for f in sorted(root.rglob("*.nii*")):
            stem = _strip_nii(f.name)
            for s in img_suffixes:
                if stem.endswith(s):
                    case = stem[: -len(s)]
                    ext = f.name[len(stem) :]
                    masks = [f.with_name(case + t + ext) for t in seg_suffixes]
                    mask = next((m for m in masks if m.exists()), None)
                    rows.append(
                        {
                            "image": str(f),
                            "mask": str(mask) if mask else "",
                            "case_id": str(f.parent.relative_to(root) / case).lstrip("./") or case,
                        }
                    )
    if not rows:
        raise InputError(root, "no NIfTI pairs found (expected imagesTr/labelsTr or *_img/*_seg files)")
    return from_dataframe(pd.DataFrame(rows), root, modality=info_modality, source=str(root))


# -------------------------------------------------------------------------------------------- resolve
_DETECTORS: list[tuple[str, Callable[[Path], bool]]] = [
    ("cxr_lung_seg", lambda p: _looks_like(p, {"image", "mask", "site", "tuberculosis", "split"})),
    ("covid_cxr_notes", lambda p: _looks_like(p, {"image", "text", "finding", "patient_id", "location"})),
    ("medmnist", lambda p: p.is_file() and p.name.lower().endswith(".npz")),
    ("nifti", lambda p: p.is_dir() and (p / "imagesTr").is_dir()),
]


def _absolute(path: str | Path) -> Path:
    """``~``, ``./x``, ``x/`` -> an absolute path (symlinks kept: the user's name for the folder)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def _abs_if_path(arg: str) -> str:
    """An importer argument that names an existing file/folder, made absolute; names stay as given."""
    if arg and Path(arg).expanduser().exists():
        return str(_absolute(arg))
    return arg


def resolve_source(
    src: str | Path, label_cols: list[str] | None = None, modality: str | None = None, **opts: Any
) -> Manifest:
    """A source spec -> Manifest: ``importer:arg``, a manifest file, a folder with a manifest, or a folder.

    Explicit ``--labels`` always win: a recognised layout with user labels is loaded as a plain manifest.
    """
    s = str(src)
    name, sep, arg = s.partition(":")
    if sep and name in IMPORTERS and not (len(name) == 1 and Path(s).exists()):
        m = IMPORTERS.create(name, arg=_abs_if_path(arg), modality=modality, **opts)
    else:
        # Absolute from here on: readers join manifest-relative paths to the root, and a relative root
        # would be applied twice (good/good/x.png).
        p = _absolute(s)
        if not p.exists():
            raise InputError(
                p,
                f"source not found (a folder, a manifest, or one of "
                f"{', '.join(n + ':...' for n in IMPORTERS.names())})",
            )
        manifest_file = (
            p
            if p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".parquet")
            else next((p / n for n in MANIFEST_NAMES if p.is_dir() and (p / n).is_file()), None)
        )
        detected = None if label_cols else next((n for n, det in _DETECTORS if det(p)), None)
        if detected:
            m = IMPORTERS.create(detected, arg=str(p), modality=modality, **opts)
        elif manifest_file is not None:
            m = load_manifest(manifest_file, label_cols=label_cols, modality=modality)
        elif p.is_dir():
            m = import_folder(str(p), modality=modality)
        else:
            raise InputError(p, "not a folder, a manifest (.csv/.parquet) or a known file type")
    return _override(m, label_cols, modality)


def default_size(m: Manifest, fallback: int = 224) -> int:
    """prepare's 2D output size when --size is not given: the source's own for MedMNIST files, else 224."""
    from medfm.data.medmnist import source_size

    return source_size(m) or fallback


def _override(m: Manifest, label_cols: list[str] | None, modality: str | None) -> Manifest:
    if label_cols and list(label_cols) != m.label_columns:
        missing = [c for c in label_cols if c not in m.label_columns]
        if missing:
            raise ConfigError(
                f"{m.source}: --labels {missing} not available from this importer "
                f"(it provides {m.label_columns}); pass a manifest file instead"
            )
        m.label_classes = {c: m.label_classes[c] for c in label_cols}
        m.label_columns = list(label_cols)
    if modality not in (None, "", "auto"):
        from medfm.data.normalize import canonical_modality

        m.modality = canonical_modality(modality)
        if m.modality is None:
            raise ConfigError(f"unknown --modality {modality!r} (auto, xray, ct, mr, us, other)")
    return m
