"""Cross-site matrix: each train-site model evaluated on each test site, with patient-level bootstrap CIs,
and the drop from internal (same-site held-out) to external performance with its CI.

Input is one predictions table (rows = test cases scored by one train-site model), so the statistics stay
independent of how the models were trained or run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from medfm.audit.fast import fast_auroc, fast_binary_fns
from medfm.errors import InputError
from medfm.eval.bootstrap import bootstrap_ci
from medfm.eval.metrics import binary_metrics

CELL_METRICS = ("auroc", "sensitivity", "specificity", "ece")


def _ci(d: Mapping) -> dict:
    return {k: d[k] for k in ("value", "lo", "hi")}


def _cell(y: np.ndarray, p: np.ndarray, threshold: float, pids, n_boot: int, alpha: float, seed: int) -> dict:
    """Point values from eval.metrics.binary_metrics; the bootstrap uses the audit's fast equivalents."""
    fast = fast_binary_fns(threshold, 10)

    def fn(yy: np.ndarray, pp: np.ndarray) -> dict:
        return {"auroc": fast["auroc"](yy, pp), "sensitivity": 1 - fast["fnr"](yy, pp),
                "specificity": 1 - fast["fpr"](yy, pp), "ece": fast["ece"](yy, pp)}

    ci = bootstrap_ci(fn, y, p, groups=pids, n_boot=n_boot, alpha=alpha, seed=seed)
    point = binary_metrics(y, p, threshold)
    return {k: {"value": float(point[k]), "lo": ci[k]["lo"], "hi": ci[k]["hi"]} for k in CELL_METRICS}


def _drop(y_int, p_int, pid_int, y_ext, p_ext, pid_ext, n_boot: int, alpha: float, seed: int) -> dict:
    """External - internal AUROC; one bootstrap over the union of both test sets' patients (the sets hold
    different patients), with a set indicator packed beside the probabilities."""
    y = np.r_[y_int, y_ext]
    packed = np.c_[np.r_[p_int, p_ext], np.r_[np.zeros(len(y_int)), np.ones(len(y_ext))]]
    pids = None
    if pid_int is not None and pid_ext is not None:
        pids = np.r_[[f"i{v}" for v in pid_int], [f"e{v}" for v in pid_ext]]

    def fn(yy: np.ndarray, pp: np.ndarray) -> dict:
        ext = pp[:, 1] == 1
        if ext.all() or not ext.any():
            return {"drop": math.nan}
        return {"drop": fast_auroc(yy[ext], pp[ext, 0]) - fast_auroc(yy[~ext], pp[~ext, 0])}

    return _ci(bootstrap_ci(fn, y, packed, groups=pids, n_boot=n_boot, alpha=alpha, seed=seed)["drop"])


def cross_site_matrix(preds: pd.DataFrame, thresholds: Mapping[str, float] | None = None,
                      label_col: str = "label", prob_col: str = "prob", train_col: str = "train_site",
                      test_col: str = "test_site", patient_col: str | None = "patient_id",
                      n_boot: int = 500, alpha: float = 0.05, seed: int = 0) -> dict:
    """Train-site x test-site AUROC, sensitivity/specificity (at each model's threshold, default 0.5) and
    ECE with CIs; per train site, external - internal AUROC with a CI (internal = test site equal to the
    train site). Returns {"cells": [...], "drops": [...], "sites": {...}}.
    """
    missing = [c for c in (label_col, prob_col, train_col, test_col) if c not in preds.columns]
    if missing:
        raise InputError(None, f"predictions table lacks column(s) {missing}")
    use_pids = patient_col is not None and patient_col in preds.columns
    thresholds = dict(thresholds or {})
    groups = {k: g for k, g in preds.groupby([train_col, test_col], sort=True)}
    cells, drops = [], []
    for (tr, te), g in groups.items():
        y, p = g[label_col].to_numpy(int), g[prob_col].to_numpy(float)
        pids = g[patient_col].astype(str).to_numpy() if use_pids else None
        cell = {"train_site": str(tr), "test_site": str(te), "internal": tr == te, "n": int(len(g)),
                "n_pos": int(y.sum()), "threshold": float(thresholds.get(str(tr), 0.5))}
        cell.update(_cell(y, p, cell["threshold"], pids, n_boot, alpha, seed))
        cells.append(cell)
    for (tr, te), g in groups.items():
        internal = groups.get((tr, tr))
        if tr == te or internal is None:
            continue
        d = _drop(internal[label_col].to_numpy(int), internal[prob_col].to_numpy(float),
                  internal[patient_col].astype(str).to_numpy() if use_pids else None,
                  g[label_col].to_numpy(int), g[prob_col].to_numpy(float),
                  g[patient_col].astype(str).to_numpy() if use_pids else None, n_boot, alpha, seed)
        drops.append({"train_site": str(tr), "test_site": str(te), "auroc_drop": d})
    return {"cells": cells, "drops": drops, "patient_level": use_pids, "n_boot": n_boot,
            "sites": {"train": sorted({str(k[0]) for k in groups}),
                      "test": sorted({str(k[1]) for k in groups})}}
