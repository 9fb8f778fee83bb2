"""The last step of `prepare`: join the per-shard tables, write manifest.parquet and summary.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from medfm.data.identifiers import public_source
from medfm.data.manifest import Manifest
from medfm.data.preprocess import normalisation_record
from medfm.data.store import MANIFEST_COLUMNS
from medfm.data.store_writer import StoreWriter
from medfm.data.summary import Summary

PROGRESS_FILE = "progress.json"


def counts(df: pd.DataFrame, label_columns: list[str]) -> dict[str, Any]:
    """Cases per split, site, label value (class index), with mask / report, and per split x site."""
    out: dict[str, Any] = {
        "split": {str(k): int(v) for k, v in df["split"].value_counts().sort_index().items()},
        "site": {str(k): int(v) for k, v in df["site"].value_counts().sort_index().items() if k != ""},
        "with_mask": int(df["has_mask"].sum()) if "has_mask" in df else 0,
        "with_report": int((df["report"].astype(str) != "").sum()),
        "label": {
            c: {str(k): int(v) for k, v in df[c].value_counts().sort_index().items()} for c in label_columns
        },
    }
    out["split_site"] = (
        {f"{a}/{b}": int(n) for (a, b), n in df.groupby(["split", "site"]).size().items()} if len(df) else {}
    )
    return out


def finalise(
    out: Path,
    src: str | Path,
    cfg: Any,
    m: Manifest,
    state: dict[str, Any],
    skipped: list[dict[str, Any]],
    leaks: list[str],
    fp: str,
    seconds: float,
    spec: dict[str, Any] | None,
    salt: str | None,
) -> Summary:
    """Join the per-shard tables into manifest.parquet, write summary.json, drop the resume files.

    cfg: the run's PrepareConfig; salt: None when identifiers are kept.
    """
    writer = StoreWriter(out)
    man = writer.joined_parts(MANIFEST_COLUMNS)
    for k in sorted(state["done"], key=int):
        skipped = skipped + state["done"][k]["skipped"]
    man = man.drop(columns=["image", "mask", "from_dicom"], errors="ignore")
    cols = (
        MANIFEST_COLUMNS
        + m.label_columns
        + [c for c in man.columns if c not in MANIFEST_COLUMNS and c not in m.label_columns]
    )
    man = man[[c for c in cols if c in man.columns]]
    writer.write_manifest(man)
    keep = cfg.keep_identifiers
    summary = Summary(
        n_cases=int(len(man)),
        n_skipped=len(skipped),
        spatial_dims=state["dims"],
        image_shape=state["image_shape"],
        image_dtype=state["image_dtype"],
        n_shards=len(state["done"]),
        shard_size=cfg.shard_size,
        has_masks=bool(man["has_mask"].any()) if len(man) else False,
        label_columns=list(m.label_columns),
        task=m.task,
        label_classes=m.label_classes,
        label_values={c: v for c, v in m.label_values.items() if c in m.label_columns},
        mask_label_names=m.mask_label_names,
        modality=m.modality or (sorted(man["modality"].unique().tolist()) if len(man) else None),
        counts=counts(man, m.label_columns) if len(man) else {},
        skipped=skipped,
        warnings=list(m.warnings),
        patient_leaks=leaks,
        identifiers="kept"
        if keep
        else "patient/study/case IDs and source paths are salted hashes (salt and case map outside dataset)",
        source=public_source(src, keep, salt),
        case_map=None if keep else f"case_map_{fp}.json",  # beside the salt, private
        settings=cfg.fingerprint_dict(),
        # Replayed on raw files at inference (medfm.data.preprocess.load_input); says what was applied, why.
        preprocessing=normalisation_record(spec, man.get("reader_notes", [])) if spec else spec,
        fingerprint=fp,
        seconds=round(seconds, 2),
        cases_per_s=round(len(man) / seconds, 1) if seconds > 0 else None,
    )
    summary = writer.write_summary(summary)
    writer.drop_parts()
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return summary
