"""Manifests: the table that says which images make a dataset, and what is known about each case.

A manifest is a CSV or Parquet file with one row per case. Columns (only ``image`` is required):

=============  =====================================================================================
image          image path relative to the manifest file (or absolute). Several images of one case
               (e.g. frontal + lateral views) are written ``"a.png;b.png"``; prepare turns each into
               its own row with case_id ``<case>/<k>`` and study_id ``<case>`` so they stay grouped.
               A DICOM series is given as its folder. ``file.npz::key/index`` points into an npz array.
mask           optional label map, same grid as the image (relative path)
report         optional free text (aliases: text, notes, findings)
patient_id     optional; groups cases for patient-level splits (missing -> the case is its own group)
study_id       optional
site           optional acquisition site / hospital
sex, age       optional (sex normalised to "M"/"F"/"")
split          optional train/val/test (aliases valid, validation); kept by prepare when present
case_id        optional unique id; default: the image path relative to the manifest, without extension
<labels>       label columns named by ``--labels`` or by ``dataset.json``; other columns pass through
=============  =====================================================================================

An optional ``dataset.json`` next to the manifest describes it::

    {"label_columns": ["tb"], "task": "binary|multiclass|multilabel", "modality": "xray|ct|mr|us|other",
     "mask_labels": {"255": 1}, "label_classes": {"tb": [0, 1]}}

Label values (medfm.data.labels): integers are kept; strings become class indices in sorted order
(recorded in ``label_classes``); empty cells become -1 (unlabelled). Values outside a declared
``label_classes`` list, stray strings in a column of numbers (``0``, ``1``, ``maybe``), or values other than
0/1 for a binary/multilabel task are an error naming the column and rows; ``--drop-bad-labels`` skips the
first two kinds and lists them. The values found and their counts are kept in ``label_values``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfm.data.labels import TASKS, encode_labels, is_empty, label_like_columns, unused_label_warning
from medfm.errors import ConfigError, InputError

__all__ = ["TASKS", "Manifest", "from_dataframe", "load_manifest", "read_table"]

STANDARD_COLUMNS = [
    "case_id",
    "image",
    "mask",
    "report",
    "patient_id",
    "study_id",
    "site",
    "sex",
    "age",
    "split",
]
ALIASES = {
    "text": "report",
    "notes": "report",
    "findings": "report",
    "path": "image",
    "filename": "image",
    "file": "image",
    "label_path": "mask",
    "seg": "mask",
    "segmentation": "mask",
    "patient": "patient_id",
    "subject_id": "patient_id",
    "gender": "sex",
    "hospital": "site",
    "center": "site",
    "centre": "site",
}
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
NPZ_REF = "::"  # "file.npz::train_images/12": item 12 of array train_images


@dataclass
class Manifest:
    """A normalised manifest: standard columns + label columns, image/mask paths absolute.

    ``df`` always has every STANDARD_COLUMNS column (empty string / NaN where unknown); ``label_columns``
    hold integer class indices (-1 = unlabelled).
    """

    df: pd.DataFrame
    root: Path
    label_columns: list[str] = field(default_factory=list)
    task: str | None = None
    modality: str | None = None
    mask_labels: dict[str, int] | None = None  # stored mask value -> label id remapping
    mask_label_names: dict[str, str] = field(default_factory=dict)  # label id -> name
    label_classes: dict[str, list[Any]] = field(default_factory=dict)
    source: str = ""
    # Rows skipped while reading (empty image, duplicate case id): {"row", "case_id", "error"}.
    bad_rows: list[dict[str, Any]] = field(default_factory=list)
    from_file: bool = False  # a user's manifest file (its paths are confined to its folder by prepare)
    # Raw label values found and their counts, {column: {value: count}} ("" = unlabelled).
    label_values: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # for the summary and the terminal

    def __len__(self) -> int:
        return len(self.df)

    def extra_columns(self) -> list[str]:
        """Columns that are neither standard nor labels (passed through to the prepared manifest)."""
        return [c for c in self.df.columns if c not in STANDARD_COLUMNS and c not in self.label_columns]

    def missing_files(self) -> list[tuple[str, str]]:
        """(case_id, "path: problem") for every row whose image or mask file does not exist."""
        out = []
        for cid, img, mask in zip(self.df["case_id"], self.df["image"], self.df["mask"]):
            for p in (img, mask):
                if isinstance(p, str) and p and not Path(p.split(NPZ_REF)[0]).exists():
                    out.append((str(cid), f"{p}: file not found (named in the manifest)"))
                    break
        return out

    def dataset_info(self) -> dict[str, Any]:
        return {
            "label_columns": self.label_columns,
            "task": self.task,
            "modality": self.modality,
            "mask_labels": self.mask_labels,
            "label_classes": self.label_classes,
        }


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV/TSV/Parquet table with a one-line error if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "manifest not found")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False)
        # Blank lines are dropped but keep their place in the index, so row numbers in messages stay the
        # file's data-row numbers (line numbers, unless a quoted field spans lines).
        return df[(df != "").any(axis=1)] if len(df.columns) else df
    except Exception as e:  # noqa: BLE001 - any parser failure is a bad input file
        raise InputError(
            path, f"cannot read manifest table ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e


def read_dataset_json(manifest_path: str | Path) -> dict[str, Any]:
    p = Path(manifest_path).parent / "dataset.json"
    if not p.is_file():
        return {}
    try:
        info = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(p, f"invalid JSON ({e})") from e
    if not isinstance(info, dict):
        raise InputError(p, "must be a JSON object")
    return info


def _declared_task(info: dict[str, Any], labels: list[str]) -> str | None:
    """dataset.json's task, unless --labels chose a subset of its columns: then the task is inferred again
    (one column picked from a multilabel set is a binary or multiclass task, not one-label multilabel)."""
    declared = info.get("task")
    if declared == "multilabel" and len(labels) == 1:
        return None
    return declared


def load_manifest(
    path: str | Path,
    label_cols: list[str] | None = None,
    task: str | None = None,
    modality: str | None = None,
    drop_bad_labels: bool | None = None,
) -> Manifest:
    """Load and validate a manifest file (CSV/Parquet) plus its optional dataset.json.

    drop_bad_labels: skip rows with stray label values instead of refusing (None: see labels.drop_bad_labels).
    """
    path = Path(os.path.abspath(Path(path).expanduser()))  # rows are relative to its folder
    df = read_table(path)
    info = read_dataset_json(path)
    labels = label_cols if label_cols else info.get("label_columns") or []
    if isinstance(labels, str):
        labels = [labels]
    m = from_dataframe(
        df,
        path.parent,
        label_columns=list(labels),
        task=task or _declared_task(info, list(labels)),
        modality=modality if modality not in (None, "", "auto") else info.get("modality"),
        mask_labels=info.get("mask_labels"),
        label_classes=info.get("label_classes"),
        source=str(path),
        drop_bad_labels=drop_bad_labels,
    )
    m.from_file = True
    m.warnings += [unused_label_warning(c) for c in label_like_columns(list(m.df.columns), m.label_columns)]
    return m


def _resolve(root: Path, value: Any) -> str:
    if is_empty(value):
        return ""
    v = str(value).strip()
    file_part, sep, key = v.partition(NPZ_REF)
    p = Path(file_part).expanduser()
    p = p if p.is_absolute() else root / p
    return str(p) + (sep + key if sep else "")


def _default_case_id(root: Path, image: str, keep_ext: bool = False) -> str:
    file_part, sep, key = image.partition(NPZ_REF)
    p = Path(file_part)
    try:
        rel = p.relative_to(root)
    except ValueError:
        rel = Path(p.name)
    name = rel.as_posix()
    for ext in (
        ()
        if keep_ext
        else (".nii.gz", ".npz", ".png", ".jpg", ".jpeg", ".dcm", ".nii", ".tif", ".tiff", ".bmp", ".npy")
    ):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return name + (f"/{key}" if sep else "")


def _norm_sex(v: Any) -> str:
    if is_empty(v):
        return ""
    s = str(v).strip().upper()
    return {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "W": "F"}.get(s, "O")


def from_dataframe(
    df: pd.DataFrame,
    root: str | Path,
    label_columns: list[str] | None = None,
    task: str | None = None,
    modality: str | None = None,
    mask_labels: dict | None = None,
    label_classes: dict[str, list[Any]] | None = None,
    source: str = "",
    drop_bad_labels: bool | None = None,
) -> Manifest:
    """Validate a raw table and normalise it to a Manifest (used by load_manifest and the importers)."""
    root = Path(root)
    where = source or str(root)
    df = df.copy()
    df.columns = [str(c).strip() for c in df.columns]
    lower = {c.lower(): c for c in df.columns}
    renames = {}
    for c in df.columns:
        canon = ALIASES.get(c.lower(), c.lower() if c.lower() in STANDARD_COLUMNS else None)
        if canon and canon not in df.columns and canon not in renames.values() and canon not in lower:
            renames[c] = canon
        elif c.lower() in STANDARD_COLUMNS and c != c.lower():
            renames[c] = c.lower()
    df = df.rename(columns=renames)
    if "image" not in df.columns:
        raise InputError(
            where, f"manifest has no 'image' column (columns: {', '.join(map(str, df.columns))})"
        )
    label_columns = list(label_columns or [])
    missing = [c for c in label_columns if c not in df.columns]
    if missing:
        raise InputError(
            where, f"label column(s) {missing} not in manifest (columns: {', '.join(df.columns)})"
        )
    # Bad rows are skipped and listed, never fatal: one typo must not stop a batch job.
    # file line: header is line 1 (read_table keeps blank lines' places in the index)
    index = df.index.to_numpy()
    df["_row"] = index + 2 if np.issubdtype(index.dtype, np.integer) else np.arange(2, len(df) + 2)
    bad_rows: list[dict[str, Any]] = []
    empty_img = df["image"].map(is_empty)
    for r in df.loc[empty_img, "_row"]:
        bad_rows.append(
            {"row": int(r), "case_id": "", "error": f"{where}: row {r}: empty 'image' (row skipped)"}
        )
    df = df[~empty_img].reset_index(drop=True)
    # Spreadsheet exports often end with a legend or notes ("# 0 = normal, 1 = TB"): rows, not cases.
    comment = df["image"].astype(str).str.lstrip().str.startswith("#")
    for r in df.loc[comment, "_row"]:
        bad_rows.append(
            {"row": int(r), "case_id": "", "error": f"{where}: row {r}: comment row (row skipped)"}
        )
    df = df[~comment].reset_index(drop=True)
    for c in STANDARD_COLUMNS:
        if c not in df.columns:
            df[c] = np.nan if c == "age" else ""
    for c in ("report", "patient_id", "study_id", "site", "case_id", "mask"):
        df[c] = ["" if is_empty(v) else str(v).strip() for v in df[c]]
    # One row per image: "a.png;b.png" -> two rows of the same study.
    if df["image"].astype(str).str.contains(";").any():
        rows = []
        for _, r in df.iterrows():
            parts = [p.strip() for p in str(r["image"]).split(";") if p.strip()]
            base = r["case_id"] or _default_case_id(root, _resolve(root, parts[0]))
            for k, p in enumerate(parts):
                rr = r.copy()
                rr["image"] = p
                rr["case_id"] = f"{base}/{k}" if len(parts) > 1 else base
                rr["study_id"] = r["study_id"] or base
                rows.append(rr)
        df = pd.DataFrame(rows).reset_index(drop=True)
    df["image"] = [_resolve(root, v) for v in df["image"]]
    df["mask"] = [_resolve(root, v) for v in df["mask"]]
    given = df["case_id"] != ""
    df["case_id"] = [c or _default_case_id(root, img) for c, img in zip(df["case_id"], df["image"])]
    # Same stem, different extension (scan.png + scan.dcm): generated IDs keep the extension instead.
    clash = ~given & df["case_id"].duplicated(keep=False)
    df.loc[clash, "case_id"] = [_default_case_id(root, img, keep_ext=True) for img in df.loc[clash, "image"]]
    dup = df["case_id"].duplicated()
    first_row = dict(zip(df["case_id"][~dup], df["_row"][~dup]))
    for cid, r in zip(df.loc[dup, "case_id"], df.loc[dup, "_row"]):  # keep the first, list the rest
        bad_rows.append(
            {
                "row": int(r),
                "case_id": str(cid),
                "error": f"{where}: row {r}: duplicate case id (first at row {first_row[cid]}; row skipped)",
            }
        )
    df = df[~dup].reset_index(drop=True)
    df["sex"] = [_norm_sex(v) for v in df["sex"]]
    df["age"] = pd.to_numeric(df["age"].replace("", np.nan), errors="coerce")
    splits = []
    for r, v in zip(df["_row"], df["split"]):
        if is_empty(v):
            splits.append("")
            continue
        s = SPLIT_ALIASES.get(str(v).strip().lower())
        if s is None:
            raise InputError(where, f"row {r}: unknown split {v!r} (use train, val or test)")
        splits.append(s)
    df["split"] = splits
    # A row whose image is not there (a "Total" line, a typo) is reported as a missing file when prepared;
    # its label must not vote on the label set (a stray 3 would make a binary task four-class). When no
    # file is there at all (a table checked before the images are copied) every row still votes.
    # Without label columns nothing votes, so the files are not checked here.
    refs = df["image"] if label_columns else []
    gone = np.array([not Path(str(v).split(NPZ_REF)[0]).exists() for v in refs], dtype=bool)
    if gone.any() and not gone.all():
        for c in label_columns:
            df[c] = df[c].astype(object)
            df.loc[gone, c] = ""
    df, labels = encode_labels(df, label_columns, task, dict(label_classes or {}), where, drop_bad_labels)
    bad_rows += labels.bad_rows
    df = df.drop(columns="_row")
    from medfm.data.normalize import canonical_modality

    mod = canonical_modality(modality) if modality not in (None, "", "auto") else None
    if modality not in (None, "", "auto") and mod is None:
        raise ConfigError(f"{where}: unknown modality {modality!r} (xray, ct, mr, us, other)")
    # mask_labels is either a value -> label remapping ({"255": 1}) or label id -> name ({"1": "lung"}).
    items = dict(mask_labels or {})
    numeric = all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for v in items.values())
    mapping = {str(k): int(v) for k, v in items.items()} if items and numeric else None
    names = {str(k): str(v) for k, v in items.items()} if items and not numeric else {}
    return Manifest(
        df=df.reset_index(drop=True),
        root=root,
        label_columns=label_columns,
        task=labels.task or None,
        modality=mod,
        mask_labels=mapping,
        mask_label_names=names,
        label_classes=labels.classes,
        source=where,
        bad_rows=sorted(bad_rows, key=lambda b: b["row"]),
        label_values=labels.values,
    )
