"""Linear probe: logistic regression on standardised frozen features, C chosen on the validation split."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler
from torch import nn

from medfm.eval.metrics import classification_metrics
from medfm.tasks.adapt.registry import ADAPTERS, feature_method, seed_independent

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
ABSENT_BIAS = -5.0  # logit offset for a class the labelled subset never shows (predicted rarely)
CERTAIN = 1e4  # logit of a certain prediction: sigmoid/softmax give exactly 0 and 1 in float32


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


def logistic_rows(clf, task: str, n_out: int, absent: float = ABSENT_BIAS) -> tuple[np.ndarray, np.ndarray]:
    """Weights (n_logits, D) and biases in standardised-feature space, in the head's logit convention
    (one logit for binary, one per class or label otherwise).

    ``absent`` is the logit offset of a class the subset never shows (and of a constant label): LP-FT
    starts from a mild one, so fine-tuning can still learn the class; ``-CERTAIN`` reproduces the probe's
    own predictions (probability exactly 0 or 1)."""
    if task == "multilabel":
        ws, bs = [], []
        for est in clf.estimators_:
            if hasattr(est, "coef_"):
                ws.append(est.coef_[0])
                bs.append(float(est.intercept_[0]))
            else:  # a label column that is constant in the subset: a fixed prediction
                const = float(np.ravel(getattr(est, "y_", [0]))[0])
                ws.append(np.zeros(clf.n_features_in_))
                bs.append(-absent if const > 0.5 else absent)
        return np.stack(ws), np.asarray(bs)
    if task == "binary":
        return clf.coef_[:1], clf.intercept_[:1]
    cls = clf.classes_.astype(int)
    coef, icpt = clf.coef_, clf.intercept_
    if len(cls) == 2:  # sklearn's binary form (one row for the second class): softmax over (0, row)
        coef = np.concatenate([np.zeros_like(coef), coef])
        icpt = np.concatenate([np.zeros_like(icpt), icpt])
    w = np.zeros((n_out, coef.shape[1]))
    b = np.full(n_out, float(icpt.min()) + absent)
    w[cls] = coef
    b[cls] = icpt
    return w, b


def linear_head(w: np.ndarray, b: np.ndarray, scaler: StandardScaler | None = None) -> nn.Linear:
    """An nn.Linear on raw embeddings computing ``w @ standardise(x) + b`` (the scaler folded in)."""
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    if scaler is not None:
        scale, mean = np.asarray(scaler.scale_, np.float64), np.asarray(scaler.mean_, np.float64)
        w, b = w / scale, b - (w * mean / scale).sum(1)
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return head


def constant_head(cls: int, task: str, n_out: int, dim: int) -> nn.Linear:
    """A head that always predicts class ``cls`` with certainty (the training subset held one class)."""
    n_logits = 1 if task == "binary" else n_out
    if task == "binary":
        b = np.array([CERTAIN if cls == 1 else -CERTAIN])
    else:
        b = np.full(n_out, -CERTAIN)
        b[cls] = 0.0
    return linear_head(np.zeros((n_logits, dim)), b)


def fit_linear_probe(x_tr: np.ndarray, y_tr: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, task: str,
                     n_out: int, c_grid: tuple[float, ...] = C_GRID, seed: int = 0):
    """Fit one logistic regression per C, keep the best on val. Returns (predict_fn, chosen C, head): the
    head is an nn.Linear on raw embeddings giving the same predictions (what a saved classifier holds)."""
    fitted = fit_best_logistic(x_tr, y_tr, x_val, y_val, task, n_out, c_grid, seed)
    if fitted is None:  # one class only: predict it
        cls = int(np.unique(y_tr)[0])

        def const(x: np.ndarray) -> np.ndarray:
            full = np.zeros((len(x), n_out))
            full[:, cls] = 1.0
            return full[:, 1] if task == "binary" else full

        return const, math.nan, constant_head(cls, task, n_out, x_tr.shape[1])
    clf, scaler, c = fitted
    w, b = logistic_rows(clf, task, n_out, absent=-CERTAIN)
    return (lambda x: _proba(clf, scaler.transform(x), task, n_out)), c, linear_head(w, b, scaler)


@ADAPTERS.register("linear", help="logistic regression on standardised frozen features (C chosen on val)")
@feature_method
# lbfgs (the default solver) ignores random_state: the fit is a function of the data alone
@seed_independent
def linear(ctx, train_idx: np.ndarray, seed: int) -> dict:
    f = ctx.features
    predict, c, head = fit_linear_probe(f["train"][train_idx], ctx.labels["train"][train_idx], f["val"],
                                        ctx.labels["val"], ctx.task, ctx.n_out, tuple(ctx.cfg.c_grid), seed)
    return {"val": predict(f["val"]), "test": predict(f["test"]), "info": {"C": c}, "head": head}
