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

from medfm.data.manifest import NPZ_REF, Manifest, from_dataframe, load_manifest, read_table
from medfm.errors import ConfigError, InputError
from medfm.registry import Registry

IMPORTERS: Registry[Manifest] = Registry("importer")

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
    ".mha",
    ".nrrd",
)
MANIFEST_NAMES = ("manifest.parquet", "manifest.csv", "manifest.tsv")
# Folders that hold label maps, not images, in a plain folder scan.
MASK_DIRS = {"masks", "mask", "labels", "labelstr", "labelsts", "segmentations", "seg"}


def _has_ext(p: Path, exts: tuple[str, ...]) -> bool:
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


# ---------------------------------------------------------------------------------------------- MedMNIST
# Modality of each MedMNIST subset (decides intensity normalisation).
_MEDMNIST_MODALITY = {
    "pathmnist": "other",
    "chestmnist": "xray",
    "dermamnist": "other",
    "octmnist": "other",
    "pneumoniamnist": "xray",
    "retinamnist": "other",
    "breastmnist": "us",
    "bloodmnist": "other",
    "tissuemnist": "other",
    "organamnist": "ct",
    "organcmnist": "ct",
    "organsmnist": "ct",
    "organmnist3d": "ct",
    "nodulemnist3d": "ct",
    "adrenalmnist3d": "ct",
    "fracturemnist3d": "ct",
    "vesselmnist3d": "mr",
    "synapsemnist3d": "other",
}
_MEDMNIST_MULTILABEL = {"chestmnist"}


def medmnist_roots() -> list[Path]:
    """Where MedMNIST npz files are looked for: $MEDFM_DATA/medmnist, then ~/.medmnist (package default)."""
    roots = []
    if os.environ.get("MEDFM_DATA"):
        roots.append(Path(os.environ["MEDFM_DATA"]) / "medmnist")
    from medfm.paths import shared_data_dir

    roots += [shared_data_dir() / "medmnist", Path.home() / ".medmnist"]
    return roots


def find_medmnist(name: str, root: str | Path | None = None) -> Path:
    """Locate ``<name>.npz`` (or ``<name>_<size>.npz``) under a root; clear error listing where it looked."""
    roots = [Path(root)] if root else medmnist_roots()
    flag = name.lower()
    for r in roots:
        for cand in (r / f"{flag}.npz", r / f"{name}.npz"):
            if cand.is_file():
                return cand
        # Case-insensitive match (e.g. BreastMNIST.npz).
        if r.is_dir():
            for f in r.iterdir():
                if f.name.lower() == f"{flag}.npz":
                    return f
    raise InputError(
        name,
        f"MedMNIST file {flag}.npz not found in {', '.join(map(str, roots))} "
        "(place it there, pass root=..., or use download=True with network access)",
    )


def download_medmnist(name: str, root: str | Path) -> Path:
    """Fetch a subset with the `medmnist` package; offline or without the package this fails clearly."""
    flag, _, size = name.lower().partition("_")
    try:
        import medmnist  # type: ignore[import-not-found]
    except ImportError as e:
        raise InputError(
            name,
            "download needs the 'medmnist' package (pip install medmnist) and network "
            f"access; otherwise place {flag}.npz under {root}",
        ) from e
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        info = medmnist.INFO[flag]
        cls = getattr(medmnist, info["python_class"])
        kw = {"size": int(size)} if size else {}
        cls(split="train", download=True, root=str(root), **kw)
    except Exception as e:  # noqa: BLE001 - network and package errors become one line
        raise InputError(
            name,
            f"MedMNIST download failed (offline?): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}",
        ) from e
    return find_medmnist(name, root)


@IMPORTERS.register(
    "medmnist", help="MedMNIST npz: medmnist:breastmnist, medmnist:organmnist3d_64, medmnist:/path/file.npz"
)
def import_medmnist(arg: str, root: str | Path | None = None, download: bool = False, **_: Any) -> Manifest:
    """MedMNIST v2 subset (2D or 3D); labels from *_labels; the official train/val/test split is kept."""
    if arg.lower().endswith(".npz") and Path(arg).expanduser().is_file():
        path = Path(arg).expanduser().resolve()
    else:
        try:
            path = find_medmnist(arg, root)
        except InputError:
            if not download:
                raise
            path = download_medmnist(arg, root or Path.home() / ".medmnist")
    try:
        npz = np.load(path)
        keys = set(npz.files)
    except Exception as e:  # noqa: BLE001
        raise InputError(path, f"not a readable npz file ({type(e).__name__})") from e
    rows, label_width = [], 1
    for split in ("train", "val", "test"):
        if f"{split}_images" not in keys:
            continue
        n = int(npz[f"{split}_images"].shape[0])
        labels = npz[f"{split}_labels"] if f"{split}_labels" in keys else None
        if labels is not None:
            labels = labels.reshape(n, -1)
            label_width = labels.shape[1]
        for i in range(n):
            row = {
                "image": f"{path}{NPZ_REF}{split}_images/{i}",
                "case_id": f"{split}/{i:06d}",
                "split": split,
            }
            if labels is not None:
                for j in range(labels.shape[1]):
                    row[f"label_{j}" if labels.shape[1] > 1 else "label"] = int(labels[i, j])
            rows.append(row)
    if not rows:
        raise InputError(path, "no train_images/val_images/test_images arrays (not a MedMNIST file)")
    df = pd.DataFrame(rows)
    flag = path.stem.lower().split("_")[0]
    label_cols = [c for c in df.columns if c == "label" or c.startswith("label_")]
    task = "multilabel" if (flag in _MEDMNIST_MULTILABEL or label_width > 1) else None
    return from_dataframe(
        df,
        path.parent,
        label_columns=label_cols,
        task=task,
        modality=_MEDMNIST_MODALITY.get(flag, "other"),
        source=str(path),
    )


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
SERIES_REF = "::series/"  # "folder::series/k": the k-th image series (by UID order) of a folder


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


def scan_folder(root: Path) -> tuple[list[str], list[str]]:
    """Recursive scan: (image files, DICOM series refs).

    A folder whose DICOM files share one series is one volume (ref = the folder); a folder with several
    series gives ``folder::series/k`` refs; standalone DICOM files (e.g. radiographs) are single images.
    """
    images, series = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in MASK_DIRS)
        d = Path(dirpath)
        files = sorted(filenames)
        dcm = [f for f in files if is_dicom_file(d / f)]
        multi, singles = _series_groups(d, dcm) if len(dcm) > 1 else ([], dcm)
        if len(multi) == 1:
            series.append(str(d))
        else:
            series += [f"{d}{SERIES_REF}{k}" for k in range(len(multi))]
        images += [str(d / f) for f in singles]
        images += [
            str(d / f)
            for f in files
            if f not in dcm and not f.startswith(".") and _has_ext(d / f, IMAGE_EXTS)
        ]
    return images, series


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


def _paths_manifest(root: Path, paths: list[str], modality: str | None) -> Manifest:
    df = pd.DataFrame({"image": paths})
    dcm = [SERIES_REF in p or Path(p).is_dir() or is_dicom_file(Path(p)) for p in paths]
    if any(dcm):
        pids, studies = dicom_patient_ids([p for p, d in zip(paths, dcm) if d])
        df["patient_id"], df["study_id"] = "", ""
        df.loc[dcm, "patient_id"] = pids
        df.loc[dcm, "study_id"] = studies
    return from_dataframe(df, root, modality=modality, source=str(root))


@IMPORTERS.register("folder", help="any folder: every image file, DICOM series folders become volumes")
def import_folder(arg: str, modality: str | None = None, **_: Any) -> Manifest:
    """Recursive scan; no labels. Folders named masks/labels are skipped (they hold label maps)."""
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise InputError(root, "not a folder")
    images, series = scan_folder(root)
    paths = sorted(images + series)
    if not paths:
        raise InputError(root, f"no images found (looked for {', '.join(IMAGE_EXTS)} and DICOM series)")
    return _paths_manifest(root, paths, modality)


@IMPORTERS.register("dicom", help="DICOM folder tree: one case per series folder (or per single file)")
def import_dicom(arg: str, modality: str | None = None, **_: Any) -> Manifest:
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise InputError(root, "not a folder")
    images, series = scan_folder(root)
    paths = sorted(series + [p for p in images if is_dicom_file(Path(p))])
    if not paths:
        raise InputError(root, "no DICOM files found")
    return _paths_manifest(root, paths, modality)


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
    return _override(m, label_cols, modality)


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
