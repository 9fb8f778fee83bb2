"""Linear probe: logistic regression on standardised frozen features, C chosen on the validation split."""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from medfm.eval.metrics import classification_metrics
from medfm.tasks.adapt.registry import ADAPTERS, feature_method, seed_independent

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _proba(clf, x: np.ndarray, task: str, n_out: int) -> np.ndarray:
    """Probabilities in the task's convention, with columns for classes absent from the training subset."""
    if task == "multilabel":
        return clf.predict_proba(x)
    raw = clf.predict_proba(x)
    full = np.zeros((len(x), n_out))
    full[:, clf.classes_.astype(int)] = raw
    return full[:, 1] if task == "binary" else full


def _score(y: np.ndarray, p: np.ndarray, task: str) -> float:
    """Model-selection score on val: AUROC, falling back to accuracy when AUROC is undefined."""
    m = classification_metrics(y, p, task)
    return m["auroc"] if math.isfinite(m["auroc"]) else m["accuracy"]


def fit_best_logistic(x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, task: str,
                      n_out: int, c_grid: tuple[float, ...] = C_GRID, seed: int = 0):
    """One logistic regression per C on standardised features, the best on val.

    Returns (classifier, scaler, C), or None when the training labels hold a single class.
    """
    if task != "multilabel" and len(np.unique(y_tr)) < 2:
        return None
    scaler = StandardScaler().fit(x_tr)
    xs_tr, xs_val = scaler.transform(x_tr), scaler.transform(x_val)
    best = (-math.inf, None, None)
    for c in c_grid:
        base = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        clf = OneVsRestClassifier(base) if task == "multilabel" else base
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=ConvergenceWarning)
            warnings.simplefilter("ignore", category=UserWarning)  # constant label columns in tiny subsets
            clf.fit(xs_tr, y_tr)
        s = _score(y_val, _proba(clf, xs_val, task, n_out), task)
        if s > best[0] or best[1] is None:
            best = (s, clf, c)
    return best[1], scaler, best[2]


def fit_linear_probe(x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, task: str,
                     n_out: int, c_grid: tuple[float, ...] = C_GRID, seed: int = 0):
    """Fit one logistic regression per C, keep the best on val. Returns (predict_fn, chosen C)."""
    fitted = fit_best_logistic(x_tr, y_tr, x_val, y_val, task, n_out, c_grid, seed)
    if fitted is None:  # one class only: predict it
        cls = int(np.unique(y_tr)[0])

        def const(x: np.ndarray) -> np.ndarray:
            full = np.zeros((len(x), n_out))
            full[:, cls] = 1.0
            return full[:, 1] if task == "binary" else full

        return const, math.nan
    clf, scaler, c = fitted
    return (lambda x: _proba(clf, scaler.transform(x), task, n_out)), c


@ADAPTERS.register("linear", help="logistic regression on standardised frozen features (C chosen on val)")
@feature_method
# lbfgs (the default solver) ignores random_state: the fit is a function of the data alone
@seed_independent
def linear(ctx, train_idx: np.ndarray, seed: int) -> dict:
    f = ctx.features
    predict, c = fit_linear_probe(f["train"][train_idx], ctx.labels["train"][train_idx], f["val"],
                                  ctx.labels["val"], ctx.task, ctx.n_out, tuple(ctx.cfg.c_grid), seed)
    return {"val": predict(f["val"]), "test": predict(f["test"]), "info": {"C": c}}
