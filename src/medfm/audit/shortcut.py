"""Shortcut detection: what can be read off the embeddings besides the disease, and does the model still work
when the anatomy is gone.

- :func:`attribute_probe`: cross-validated logistic-regression AUROC for predicting an attribute (site, sex,
  age band) from embeddings, with a patient-level bootstrap CI. Zech et al. 2018 found the hospital
  predictable at AUC 0.86 from the images alone; a high probe AUROC says the encoder carries that signal and
  a classifier on top may use it.
- :func:`paired_auroc_change`: the model's AUROC on original vs modified images (lung fields blanked, a site
  marker decorrelated from the label) with a paired bootstrap CI of the difference.

Folds are grouped by patient when ids are given: images of one patient in both training and held-out folds
let the probe recognise the patient instead of the attribute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from medfm.audit.fairness import UNKNOWN, age_bands, clean_groups
from medfm.audit.fast import fast_auroc
from medfm.errors import InputError
from medfm.eval.bootstrap import bootstrap_ci
from medfm.eval.metrics import multiclass_metrics


def _probe_auroc(y: np.ndarray, p: np.ndarray) -> dict:
    if p.shape[1] == 2:
        return {"auroc": fast_auroc(y, p[:, 1])}
    return {"auroc": multiclass_metrics(y, p)["auroc"]}


def attribute_probe(features: np.ndarray, attribute: Sequence | np.ndarray,
                    patient_ids: Sequence | None = None, n_folds: int = 5, C: float = 1.0, n_boot: int = 200,
                    alpha: float = 0.05, margin: float = 0.05, seed: int = 0) -> dict:
    """How well ``attribute`` is predicted from ``features`` (out-of-fold AUROC; macro one-vs-rest for more
    than two classes). Rows with an unknown attribute, and classes with fewer than ``n_folds`` cases, are
    left out (and counted). ``predictable`` is True when the CI's lower end exceeds 0.5 + ``margin``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    a = clean_groups(attribute)
    if len(a) != len(x):
        raise InputError(None, f"attribute has {len(a)} values for {len(x)} feature rows")
    counts = pd.Series(a).value_counts()
    keep_classes = sorted(c for c, n in counts.items() if c != UNKNOWN and n >= n_folds)
    keep = np.isin(a, keep_classes)
    out: dict = {"classes": keep_classes, "n": int(keep.sum()), "n_excluded": int((~keep).sum()),
                 "n_folds": n_folds, "patient_grouped": patient_ids is not None, "chance": 0.5,
                 "auroc": {"value": math.nan, "lo": math.nan, "hi": math.nan}, "predictable": False}
    if len(keep_classes) < 2:
        out["note"] = "fewer than two classes with enough cases"
        return out
    x, y = x[keep], np.searchsorted(keep_classes, a[keep])
    pids = None if patient_ids is None else np.asarray(patient_ids, dtype=object)[keep].astype(str)
    if pids is not None:
        cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    else:
        cv = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    oof = cross_val_predict(model, x, y, cv=cv, groups=pids, method="predict_proba")
    ci = bootstrap_ci(_probe_auroc, y, oof, groups=pids, n_boot=n_boot, alpha=alpha, seed=seed)["auroc"]
    out["auroc"] = {k: ci[k] for k in ("value", "lo", "hi")}
    out["predictable"] = bool(ci["lo"] > 0.5 + margin)
    return out


def shortcut_audit(features: np.ndarray, attributes: Mapping[str, Sequence | np.ndarray],
                   patient_ids: Sequence | None = None, n_boot: int = 200, seed: int = 0) -> dict[str, dict]:
    """:func:`attribute_probe` per attribute; an attribute named "age" is banded with ``age_bands`` first."""
    return {name: attribute_probe(features, age_bands(values) if name == "age" else values, patient_ids,
                                  n_boot=n_boot, seed=seed)
            for name, values in attributes.items()}


def paired_auroc_change(y: np.ndarray, p_original: np.ndarray, p_modified: np.ndarray,
                        patient_ids: Sequence | None = None, n_boot: int = 500, alpha: float = 0.05,
                        margin: float = 0.05, seed: int = 0) -> dict:
    """AUROC on the original and on the modified inputs (same cases), and modified - original, each with a
    paired patient-level bootstrap CI. ``still_above_chance``: the modified AUROC's CI lower end exceeds
    0.5 + ``margin`` (with the anatomy blanked, that means the model reads something other than anatomy).
    """
    y = np.asarray(y).astype(int).reshape(-1)
    pair = np.c_[np.asarray(p_original, float).reshape(-1), np.asarray(p_modified, float).reshape(-1)]
    if len(pair) != len(y):
        raise InputError(None, f"{len(y)} labels for {len(pair)} predictions")

    def both(yy: np.ndarray, pp: np.ndarray) -> dict:
        a, b = fast_auroc(yy, pp[:, 0]), fast_auroc(yy, pp[:, 1])
        return {"original": a, "modified": b, "difference": b - a}

    ci = bootstrap_ci(both, y, pair, groups=patient_ids, n_boot=n_boot, alpha=alpha, seed=seed)
    out = {k: {s: ci[k][s] for s in ("value", "lo", "hi")} for k in ("original", "modified", "difference")}
    out["still_above_chance"] = bool(ci["modified"]["lo"] > 0.5 + margin)
    out["n"] = int(len(y))
    return out
