"""Evaluate saved predictions: metrics + patient-level bootstrap CIs, for one file or an adapt directory.

A predictions table has one row per case and either ``y`` + ``p`` (binary, p = P(y=1)),
``y`` + ``p_0..p_{C-1}`` (multi-class) or ``y_<label>`` + ``p_<label>`` pairs (multi-label);
``patient_id`` is used for resampling
when present. ``medfm adapt`` writes such tables (predictions.parquet, with a ``run_id`` column).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.errors import InputError
from medfm.eval.bootstrap import bootstrap_ci
from medfm.eval.metrics import classification_metrics, infer_task

META = {"run_id", "method", "regime", "budget", "seed", "case_id", "patient_id", "site", "split"}


def read_predictions(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such predictions file")
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as e:  # pandas/pyarrow raise many types for a corrupt or non-table file
        raise InputError(path, f"cannot read predictions table ({type(e).__name__}: {str(e)[:80]})") from None


def split_columns(df: pd.DataFrame, where: str | Path = "predictions") -> tuple[np.ndarray, np.ndarray, str,
                                                                                   list[str]]:
    """(y, p, task, label_names) from a predictions table, with a clear error for a wrong layout."""
    cols = [c for c in df.columns if c not in META]
    if "y" in cols and "p" in cols:
        y, p = df["y"].to_numpy().astype(int), df["p"].to_numpy(dtype=np.float64)
        return y, p, "binary", ["0", "1"]
    pcols = sorted((c for c in cols if c.startswith("p_") and c[2:].isdigit()), key=lambda c: int(c[2:]))
    if "y" in cols and pcols:
        p = df[pcols].to_numpy(dtype=np.float64)
        y = df["y"].to_numpy().astype(int)
        task = "binary" if p.shape[1] == 2 else "multiclass"
        return y, (p[:, 1] if task == "binary" else p), task, [c[2:] for c in pcols]
    names = [c[2:] for c in cols if c.startswith("y_") and f"p_{c[2:]}" in cols]
    if names:
        y = df[[f"y_{n}" for n in names]].to_numpy().astype(int)
        p = df[[f"p_{n}" for n in names]].to_numpy(dtype=np.float64)
        return y, p, "multilabel", names
    raise InputError(where, "predictions need columns y and p (binary), y and p_0..p_K (multi-class), or "
                            f"y_<label>/p_<label> pairs (multi-label); found {cols[:8]}")


def evaluate_table(df: pd.DataFrame, threshold: float | str | list[float] = 0.5, n_boot: int = 1000,
                   seed: int = 0, where: str | Path = "predictions") -> dict:
    """Point metrics and bootstrap CIs for one set of predictions."""
    y, p, task, names = split_columns(df, where)
    if not np.isfinite(p).all():
        raise InputError(where, "predictions contain NaN or infinite probabilities")
    task = task or infer_task(y, p)
    fn = partial(classification_metrics, task=task, threshold=threshold,
                 label_names=names if task == "multilabel" else None)
    point = fn(y, p)
    groups = df["patient_id"].astype(str).to_numpy() if "patient_id" in df else None
    out = {"task": task, "n": int(len(df)), "metrics": point,
           "resampling": "patient" if groups is not None and len(set(groups)) < len(groups) else "case"}
    if n_boot > 0:
        out["ci"] = bootstrap_ci(fn, y, p, groups, n_boot=n_boot, seed=seed)
        out["n_boot"] = n_boot
    return out


RECORDED = "recorded"  # threshold setting: each adapt run's own (chosen on val when the run was made)


def recorded_thresholds(adapt_dir: str | Path) -> dict[str, float | list[float]]:
    """run_id -> the decision threshold the adapt run applied to test (results.csv ``threshold``: a number,
    or a JSON list per label). Runs without one (or old tables without the column) are left out."""
    import math

    p = Path(adapt_dir) / "results.csv"
    if not p.is_file():
        return {}
    res = pd.read_csv(p)
    if "threshold" not in res or "run_id" not in res:
        return {}
    out: dict[str, float | list[float]] = {}
    for rid, t in zip(res["run_id"].astype(str), res["threshold"]):
        if isinstance(t, str) and t.strip().startswith("["):
            out[rid] = [float(v) for v in json.loads(t)]
        else:
            try:
                v = float(t)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                out[rid] = v
    return out


def evaluate_adapt_dir(adapt_dir: str | Path, threshold: float | str = RECORDED, n_boot: int = 1000,
                       all_runs: bool = False, seed: int = 0, on_run=None) -> pd.DataFrame:
    """Recompute metrics of every run in an adapt directory; bootstrap CIs for the largest label budget of
    each method and regime (seed 0), or for every run with ``all_runs``. Returns one row per run.

    ``threshold``: "recorded" (default) applies each run's own threshold, the one the run chose on val and
    applied to test (0.5 where a run recorded none), so the numbers match ``medfm adapt``'s; a number or
    "youden" applies that to every run instead."""
    root = Path(adapt_dir)
    preds = read_predictions(root / "predictions.parquet")
    recorded = recorded_thresholds(root) if threshold == RECORDED else {}
    runs = preds[["run_id", "method", "regime", "budget", "seed"]].drop_duplicates()
    largest = runs.groupby(["method", "regime"])["budget"].transform("max")
    runs = runs.assign(ci=all_runs | ((runs["budget"] == largest) & (runs["seed"] == runs["seed"].min())))
    rows = []
    for r in runs.itertuples(index=False):
        thr = recorded.get(str(r.run_id), 0.5) if threshold == RECORDED else threshold
        res = evaluate_table(preds[preds["run_id"] == r.run_id], thr, n_boot if r.ci else 0, seed,
                             where=root / "predictions.parquet")
        row = {"run_id": r.run_id, "method": r.method, "regime": r.regime, "budget": r.budget, "seed": r.seed,
               "threshold": json.dumps(thr) if isinstance(thr, list) else thr,
               **{k: v for k, v in res["metrics"].items() if not k.startswith("auroc/")}}
        for k, ci in res.get("ci", {}).items():
            if "/" not in k:
                row[f"{k}_lo"], row[f"{k}_hi"] = ci["lo"], ci["hi"]
        rows.append(row)
        if on_run:
            on_run()
    return pd.DataFrame(rows)
