"""Per-subgroup performance of a binary classifier, with fairlearn's MetricFrame and patient-level CIs.

For each sensitive attribute (sex, age band, site, any manifest column): AUROC, FNR (underdiagnosis,
Seyyed-Kalantari et al. 2021), FPR, ECE and selection rate per group; equalized-odds and demographic-parity
differences (fairlearn.metrics); and each group's gap to a reference group with a bootstrap CI that
resamples patients. Groups with fewer than ``min_size`` cases are reported but flagged and left out of the
ranking and of the differences: their numbers are noise, and ranking them invites false conclusions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from medfm.audit.fast import fast_binary_fns
from medfm.errors import ConfigError, InputError
from medfm.eval.bootstrap import bootstrap_ci
from medfm.eval.calibration import expected_calibration_error
from medfm.eval.metrics import positive_prob

DEFAULT_AGE_EDGES = (0, 18, 40, 60, 80)
METRICS = ("auroc", "fnr", "fpr", "ece", "selection_rate")
UNKNOWN = "unknown"


def age_bands(ages: Sequence | np.ndarray, edges: Sequence[float] = DEFAULT_AGE_EDGES) -> np.ndarray:
    """Age in years -> band labels "0-17", "18-39", ..., "80+"; missing or unparsable ages -> "unknown"."""
    a = pd.to_numeric(pd.Series(np.asarray(ages, dtype=object)), errors="coerce").to_numpy(float)
    edges = [float(e) for e in edges]
    labels = [f"{int(lo)}-{int(hi) - 1}" for lo, hi in zip(edges[:-1], edges[1:])] + [f"{int(edges[-1])}+"]
    idx = np.searchsorted(edges, a, side="right") - 1
    out = np.array([labels[i] if i >= 0 else UNKNOWN for i in np.clip(idx, -1, len(labels) - 1)],
                   dtype=object)
    out[~np.isfinite(a) | (a < edges[0])] = UNKNOWN
    return out


def clean_groups(values: Sequence | np.ndarray) -> np.ndarray:
    """Group labels as stripped strings; blank, NaN and None -> "unknown"."""
    s = pd.Series(np.asarray(values, dtype=object)).astype(str).str.strip()
    return s.where(~s.isin(["", "nan", "None", "NaN", "<NA>"]), UNKNOWN).to_numpy(object)


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else math.nan


def _metric_fns(threshold: float, n_bins: int) -> dict:
    """MetricFrame metrics over (y_true, p): fairlearn's rates on thresholded p, AUROC and ECE on p."""
    from fairlearn.metrics import count, false_negative_rate, false_positive_rate, selection_rate

    def fnr(y, p):  # fairlearn returns 0 for a group without positives; undefined is more honest
        return float(false_negative_rate(y, p >= threshold)) if (np.asarray(y) == 1).any() else math.nan

    def fpr(y, p):
        return float(false_positive_rate(y, p >= threshold)) if (np.asarray(y) == 0).any() else math.nan

    return {
        "auroc": lambda y, p: _auroc(np.asarray(y), np.asarray(p)),
        "fnr": fnr,
        "fpr": fpr,
        "ece": lambda y, p: expected_calibration_error(np.asarray(y), np.asarray(p), "binary", n_bins),
        "selection_rate": lambda y, p: float(selection_rate(y, p >= threshold)),
        "n": count,
        "n_pos": lambda y, p: int((np.asarray(y) == 1).sum()),
    }


def subgroup_metrics(y: np.ndarray, p: np.ndarray, groups: Sequence | np.ndarray, threshold: float = 0.5,
                     n_bins: int = 10) -> pd.DataFrame:
    """MetricFrame.by_group: one row per group, columns auroc, fnr, fpr, ece, selection_rate, n, n_pos."""
    from fairlearn.metrics import MetricFrame

    y, p = np.asarray(y).astype(int), positive_prob(p)
    mf = MetricFrame(metrics=_metric_fns(threshold, n_bins), y_true=y, y_pred=p,
                     sensitive_features=pd.Series(clean_groups(groups), name="group"))
    return mf.by_group


def _bootstrap_by_group(y: np.ndarray, p: np.ndarray, codes: np.ndarray, names: list[str], ref: int | None,
                        threshold: float, n_bins: int, patient_ids: Sequence | None, n_boot: int,
                        alpha: float, seed: int) -> dict:
    """One patient-level bootstrap for every group's metrics and every gap to the reference group.

    bootstrap_ci resamples rows of (y, p) together; packing the group code as p's second column lets one
    resampling serve all groups, so a gap's CI accounts for both groups being resampled at once.
    """
    fns = fast_binary_fns(threshold, n_bins)

    def per_group(yy: np.ndarray, packed: np.ndarray) -> dict:
        pp, cc = packed[:, 0], packed[:, 1].astype(int)
        vals = {}
        for k, name in enumerate(names):
            m = cc == k
            for metric in METRICS:
                vals[f"{metric}@{name}"] = fns[metric](yy[m], pp[m]) if m.any() else math.nan
        if ref is not None:
            for name in names:
                if name != names[ref]:
                    for metric in METRICS:
                        mine, theirs = vals[f"{metric}@{name}"], vals[f"{metric}@{names[ref]}"]
                        vals[f"{metric}:gap@{name}"] = mine - theirs
        return vals

    return bootstrap_ci(per_group, y, np.c_[p, codes], groups=patient_ids, n_boot=n_boot, alpha=alpha,
                        seed=seed)


def fairness_for_attribute(y: np.ndarray, p: np.ndarray, groups: Sequence | np.ndarray,
                           threshold: float = 0.5, patient_ids: Sequence | None = None, min_size: int = 30,
                           n_boot: int = 200, alpha: float = 0.05, reference: str | None = None,
                           n_bins: int = 10, seed: int = 0) -> dict:
    """The fairness table for one attribute.

    Returns {"groups": [{group, n, n_pos, too_small, fnr_rank, <metric>: {value, lo, hi}, gap: {...}}],
    "reference", "equalized_odds_difference", "demographic_parity_difference", "min_size", ...}.
    Differences are fairlearn's, over the groups with at least ``min_size`` cases; fnr_rank 1 is the most
    underdiagnosed adequately sized group. reference: the group gaps are measured against (default: the
    largest group).
    """
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    y, p = np.asarray(y).astype(int), positive_prob(p)
    g = clean_groups(groups)
    if not len(y) == len(p) == len(g):
        raise InputError(None, f"lengths differ: {len(y)} labels, {len(p)} predictions, "
                               f"{len(g)} group values")
    table = subgroup_metrics(y, p, g, threshold, n_bins)
    names = [str(n) for n in table.index]
    sizes = dict(zip(names, table["n"].astype(int)))
    adequate = [n for n in names if sizes[n] >= min_size]
    ref = reference if reference is not None else (max(adequate, key=sizes.get) if adequate else None)
    if ref is not None and ref not in names:
        raise ConfigError(f"reference group {ref!r} not among {names}")
    index = {n: i for i, n in enumerate(names)}
    codes = np.array([index[v] for v in g], dtype=np.int64)
    ci = _bootstrap_by_group(y, p, codes, names, names.index(ref) if ref is not None else None, threshold,
                             n_bins, patient_ids, n_boot, alpha, seed)
    ranked = sorted((n for n in adequate if np.isfinite(table.loc[n, "fnr"])),
                    key=lambda n: -table.loc[n, "fnr"])
    rows = []
    for name in names:
        row: dict = {"group": name, "n": sizes[name], "n_pos": int(table.loc[name, "n_pos"]),
                     "too_small": sizes[name] < min_size,
                     "fnr_rank": ranked.index(name) + 1 if name in ranked else None}
        for metric in METRICS:
            c = ci[f"{metric}@{name}"]
            row[metric] = {"value": float(table.loc[name, metric]), "lo": c["lo"], "hi": c["hi"]}
        if ref is not None and name != ref:
            row["gap"] = {m: {k: ci[f"{m}:gap@{name}"][k] for k in ("value", "lo", "hi")} for m in METRICS}
        rows.append(row)
    keep = np.isin(g, adequate)
    out = {"groups": rows, "reference": ref, "min_size": min_size, "threshold": threshold,
           "n_boot": n_boot, "patient_level": patient_ids is not None,
           "equalized_odds_difference": math.nan, "demographic_parity_difference": math.nan}
    if len(adequate) >= 2:
        pred = (p[keep] >= threshold).astype(int)
        out["equalized_odds_difference"] = float(equalized_odds_difference(y[keep], pred,
                                                                           sensitive_features=g[keep]))
        out["demographic_parity_difference"] = float(demographic_parity_difference(
            y[keep], pred, sensitive_features=g[keep]))
    return out


def fairness_audit(y: np.ndarray, p: np.ndarray, attributes: Mapping[str, Sequence | np.ndarray],
                   threshold: float = 0.5, patient_ids: Sequence | None = None, min_size: int = 30,
                   n_boot: int = 200, alpha: float = 0.05, seed: int = 0) -> dict[str, dict]:
    """:func:`fairness_for_attribute` per attribute (e.g. {"sex": ..., "age_band": ..., "site": ...})."""
    return {name: fairness_for_attribute(y, p, values, threshold, patient_ids, min_size, n_boot, alpha,
                                         seed=seed)
            for name, values in attributes.items()}
