"""Audit cohorts with known ground truth, made from a prepared phantom store.

An audit is only trustworthy if it finds what is known to be there. Each function here copies a prepared
store (``medfm data phantom`` + ``medfm data prepare``) and plants one defect whose size is set by the
caller, recording the truth in the new store's ``summary.json`` (``extra["cohort"]``):

- :func:`flip_labels` — label bias: a fraction ``rate`` of one subgroup's positive labels are recorded as
  negative in the training splits (Seyyed-Kalantari et al. 2021: under-reported disease in a group teaches
  the model to under-diagnose it). Test labels stay true, so the audit sees the resulting FNR gap.
- :func:`plant_site_marker` — shortcut: a bright corner marker (a "site" stamp) drawn on images so that
  in train/val it goes with the label, while in test it is independent of it (DeGrave et al. 2021).
  The marker status becomes the store's ``site`` column (the original site is kept in ``phantom_site``).

Both write through :class:`medfm.data.store_writer.StoreWriter`, the one store writer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfm.data.store import read_manifest
from medfm.data.store_writer import StoreWriter, shard_name
from medfm.data.summary import Summary, load_summary
from medfm.errors import InputError

COHORT_KEY = "cohort"  # summary.json extra key holding the planted ground truth
MARKED, PLAIN = "site_marked", "site_plain"


def _tally(values: pd.Series) -> dict[str, int]:
    """{value as text: count}, in value order (the form of summary.json counts)."""
    return values.astype(str).value_counts().sort_index().to_dict()


def _label_column(summary: Summary, root: Path, label: str | None) -> str:
    if summary.task != "binary" or not summary.label_columns:
        kind = summary.task or "unlabelled"
        raise InputError(root, f"a cohort needs a binary-labelled store, this one is {kind}")
    col = label or summary.label_columns[0]
    if col not in summary.label_columns:
        raise InputError(root, f"label '{col}' is not one of the store's labels {summary.label_columns}")
    return col


def _shards(root: Path, kind: str, n: int) -> list[np.ndarray]:
    out = []
    for k in range(n):
        p = root / kind / shard_name(k)
        if not p.is_file():
            raise InputError(p, f"missing {kind} shard of the prepared store")
        out.append(np.load(p))
    return out


def _write(src: Path, out: Path, m: pd.DataFrame, images: list[np.ndarray], summary: Summary,
           label: str, truth: dict[str, Any]) -> Summary:
    """Write the modified copy: shards (masks copied), manifest, then the summary with the ground truth."""
    out = Path(out)
    if out.resolve() == src.resolve():
        raise InputError(out, "the cohort must be written to a new folder, not over its source store")
    masks = _shards(src, "masks", len(images)) if summary.has_masks else [None] * len(images)
    w = StoreWriter(out)
    for k, (img, msk) in enumerate(zip(images, masks, strict=True)):
        w.write_shard(k, img, msk)
    w.write_manifest(m)
    values = _tally(m[label].astype(int))
    counts = dict(summary.counts)
    if isinstance(counts.get("label"), dict):
        counts["label"] = {**counts["label"], label: values}
    if "site" in m.columns:
        counts["site"] = _tally(m["site"])
    extra = {**summary.extra, COHORT_KEY: truth}
    # A new dataset: its fingerprint follows from the source's and what was planted.
    blob = json.dumps([summary.fingerprint, truth], sort_keys=True, default=str).encode()
    return w.write_summary(replace(summary, label_values={**summary.label_values, label: values},
                                   counts=counts, extra=extra,
                                   fingerprint=hashlib.sha256(blob).hexdigest()[:24]))


def _load(store: str | Path) -> tuple[Path, Summary, pd.DataFrame, list[np.ndarray]]:
    root = Path(store)
    summary = load_summary(root)
    m = read_manifest(root).reset_index(drop=True)
    return root, summary, m, _shards(root, "images", int(summary.n_shards or 0))


def flip_labels(store: str | Path, out: str | Path, group_column: str, group_value: Any, rate: float,
                seed: int = 0, label: str | None = None,
                splits: Sequence[str] = ("train", "val")) -> dict[str, Any]:
    """Copy ``store`` to ``out`` with ``rate`` of the positive ``label`` of cases whose ``group_column``
    equals ``group_value`` set to 0 in ``splits`` (by patient, so a patient's studies agree).

    Returns the ground truth also saved in ``summary.json`` extra["cohort"]: the group, the rate asked
    for and achieved per split, and how many labels were flipped. Test labels are left true (default
    ``splits``), so a model trained on the cohort under-diagnoses the group and the audit can measure it.
    """
    if not 0.0 <= rate <= 1.0:
        raise InputError(out, f"flip rate must be within [0, 1], got {rate}")
    root, summary, m, images = _load(store)
    col = _label_column(summary, root, label)
    if group_column not in m.columns:
        raise InputError(root, f"manifest has no column '{group_column}' (columns: {', '.join(m.columns)})")
    in_group = m[group_column].astype(str) == str(group_value)
    if not in_group.any():
        raise InputError(root, f"no case has {group_column} = {group_value!r}")
    rng = np.random.default_rng(seed)
    y = m[col].to_numpy().astype(int)
    flipped = np.zeros(len(m), bool)
    per_split: dict[str, dict[str, Any]] = {}
    for s in splits:
        cand = (in_group & (m["split"] == s) & (y == 1)).to_numpy()
        pids = np.array(sorted(m.loc[cand, "patient_id"].astype(str).unique()))
        k = int(round(rate * len(pids)))
        chosen = set(rng.choice(pids, size=k, replace=False)) if k else set()
        hit = cand & m["patient_id"].astype(str).isin(chosen).to_numpy()
        flipped |= hit
        per_split[s] = {"positives": int(cand.sum()), "flipped": int(hit.sum()),
                        "achieved_rate": float(hit.sum() / cand.sum()) if cand.sum() else None}
    m[col] = np.where(flipped, 0, y).astype(m[col].dtype)
    m["cohort_flipped"] = flipped  # what was planted, per case (the audit never reads it)
    truth = {"kind": "flip_labels", "label": col, "group_column": group_column,
             "group_value": str(group_value), "rate": float(rate), "seed": int(seed),
             "splits": list(splits), "per_split": per_split, "n_flipped": int(flipped.sum()),
             "expect": f"under-diagnosis (higher FNR) of {group_column}={group_value} in test predictions"}
    _write(root, Path(out), m, images, summary, col, truth)
    return truth


def draw_marker(image: np.ndarray, size: int, corner: str = "top_right") -> np.ndarray:
    """``image`` (C, H, W) with a ``size``-pixel square at its maximum value in one corner."""
    out = image.copy()
    hi = np.iinfo(out.dtype).max if np.issubdtype(out.dtype, np.integer) else float(np.max(out))
    h, w = out.shape[-2:]
    rows = slice(0, size) if corner.startswith("top") else slice(h - size, h)
    cols = slice(w - size, w) if corner.endswith("right") else slice(0, size)
    out[..., rows, cols] = hi
    return out


def plant_site_marker(store: str | Path, out: str | Path, correlation: float = 0.9,
                      test_rate: float = 0.5, size: int | None = None, corner: str = "top_right",
                      seed: int = 0, label: str | None = None,
                      train_splits: Sequence[str] = ("train", "val")) -> dict[str, Any]:
    """Copy ``store`` to ``out`` with a bright corner marker on some images.

    In ``train_splits`` a positive case carries the marker with probability ``correlation`` and a negative
    one with probability ``1 - correlation``; in every other split with probability ``test_rate``
    whatever its label. Marker status is per patient and becomes the ``site`` column (``site_marked`` /
    ``site_plain``; the phantom's own site moves to ``phantom_site``). Returns the ground truth, also
    saved in ``summary.json`` extra["cohort"], with the achieved label-marker correlation per split.
    """
    if not 0.0 <= correlation <= 1.0 or not 0.0 <= test_rate <= 1.0:
        raise InputError(out, f"correlation and test_rate must be within [0, 1], got {correlation}, "
                              f"{test_rate}")
    root, summary, m, images = _load(store)
    col = _label_column(summary, root, label)
    side = int(images[0].shape[-1]) if images else 0
    size = size or max(2, side // 8)
    rng = np.random.default_rng(seed)
    y = m[col].to_numpy().astype(int)
    # One draw per patient (on the patient's first study label) so a patient's studies share a site.
    first = m.groupby(m["patient_id"].astype(str), sort=True).head(1)
    trained = first["split"].isin(list(train_splits)).to_numpy()
    p = np.where(trained, np.where(y[first.index] == 1, correlation, 1.0 - correlation), test_rate)
    marked_pid = dict(zip(first["patient_id"].astype(str), rng.random(len(first)) < p, strict=True))
    marked = m["patient_id"].astype(str).map(marked_pid).to_numpy(bool)
    for i in np.flatnonzero(marked):
        k, j = int(m.at[i, "shard"]), int(m.at[i, "index"])
        images[k][j] = draw_marker(images[k][j], size, corner)
    if "site" in m.columns:
        m["phantom_site"] = m["site"]
    m["site"] = np.where(marked, MARKED, PLAIN)
    per_split = {}
    for s in sorted(m["split"].astype(str).unique()):
        sel = (m["split"] == s).to_numpy()
        yy, mm = y[sel], marked[sel].astype(int)
        corr = float(np.corrcoef(yy, mm)[0, 1]) if yy.std() > 0 and mm.std() > 0 else None
        per_split[s] = {"n": int(sel.sum()), "marked": int(mm.sum()), "phi_label_marker": corr,
                        "p_marked_given_pos": float(mm[yy == 1].mean()) if (yy == 1).any() else None,
                        "p_marked_given_neg": float(mm[yy == 0].mean()) if (yy == 0).any() else None}
    truth = {"kind": "site_marker", "label": col, "site_column": "site", "marked_value": MARKED,
             "correlation": float(correlation), "test_rate": float(test_rate), "marker_px": int(size),
             "corner": corner, "seed": int(seed), "train_splits": list(train_splits), "per_split": per_split,
             "expect": "site predictable from embeddings; AUROC falls where the marker stops following "
                       "the label"}
    _write(root, Path(out), m, images, summary, col, truth)
    return truth


def select_cases(store: str | Path, out: str | Path, keep: np.ndarray | None = None,
                 label: str | None = None, drop_labels: bool = False) -> Path:
    """Copy the cases of ``store`` where ``keep`` (manifest order) is True into ``out``, optionally with a
    different binary label column of the manifest as the label (e.g. another phantom finding), or with no
    labels at all (``drop_labels``: the copy is audited in monitor mode). Shards are rewritten as one."""
    root, summary, m, imgs = _load(store)
    keep = np.ones(len(m), bool) if keep is None else np.asarray(keep, bool)
    if len(keep) != len(m) or not keep.any():
        raise InputError(root, f"selection must mark some of the {len(m)} cases, got {int(keep.sum())} "
                               f"of {len(keep)}")
    if label is not None:  # metadata columns may be stored as text ("0"/"1")
        vals = pd.to_numeric(m[label], errors="coerce") if label in m.columns else None
        if vals is None or not vals.isin([0, 1]).all():
            raise InputError(root, f"manifest column '{label}' is not a 0/1 label")
        m[label] = vals.astype(np.int64)
    sel = m[keep].reset_index(drop=True)
    msks = _shards(root, "masks", len(imgs)) if summary.has_masks else None
    rows = list(zip(sel["shard"].astype(int), sel["index"].astype(int), strict=True))
    w = StoreWriter(out)
    w.write_shard(0, np.stack([imgs[k][j] for k, j in rows]),
                  None if msks is None else np.stack([msks[k][j] for k, j in rows]))
    sel["shard"], sel["index"] = 0, np.arange(len(sel))
    cols = [label] if label is not None else ([] if drop_labels else list(summary.label_columns))
    if drop_labels:
        sel = sel.drop(columns=[c for c in summary.label_columns if c in sel.columns])
    w.write_manifest(sel)
    split_counts = _tally(sel["split"])
    values = {c: _tally(sel[c].astype(int)) for c in cols}
    blob = json.dumps([summary.fingerprint, keep.tolist(), label, drop_labels]).encode()
    w.write_summary(replace(
        summary, n_cases=len(sel), n_skipped=0, skipped=[], n_shards=1, shard_size=len(sel),
        label_columns=cols, task="binary" if cols else None,
        label_classes={c: [0, 1] for c in cols}, label_values=values,
        counts={"split": split_counts, "label": values,
                "site": _tally(sel["site"]) if "site" in sel
                else {},
                "with_mask": int(sel["has_mask"].fillna(False).sum()) if "has_mask" in sel else 0},
        fingerprint=hashlib.sha256(blob).hexdigest()[:24]))
    return Path(out)


def cohort_truth(store: str | Path) -> dict[str, Any] | None:
    """The ground truth a cohort function recorded in ``store`` (None for an ordinary store)."""
    return load_summary(store).extra.get(COHORT_KEY)
