"""Classification metrics as pure functions returning flat dicts (scikit-learn / torchmetrics underneath).

Conventions: ``task`` is "binary" (y (n,) in {0,1}, p (n,) = P(y=1) or (n, 2)), "multiclass" (y (n,) ints,
p (n, C) rows summing to 1) or "multilabel" (y, p (n, K); one-vs-rest, macro-averaged).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score, roc_curve
from torchmetrics.functional.classification import binary_auroc

from medfm.eval.calibration import expected_calibration_error

TASKS = ("binary", "multiclass", "multilabel")


def infer_task(y: np.ndarray, p: np.ndarray | None = None) -> str:
    """Guess the task from label (and probability) shapes."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return "multilabel"
    if p is not None and np.asarray(p).ndim == 2 and np.asarray(p).shape[1] > 2:
        return "multiclass"
    return "binary" if len(np.unique(y)) <= 2 else "multiclass"


def positive_prob(p: np.ndarray) -> np.ndarray:
    """Binary probabilities as (n,) P(y=1), accepting (n,), (n, 1) or (n, 2)."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 2:
        p = p[:, 1] if p.shape[1] == 2 else p[:, 0]
    return p


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J); 0.5 if y has one class."""
    y = np.asarray(y).astype(int)
    p = positive_prob(p)
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    j = int(np.argmax(tpr - fpr))
    return float(min(thr[j], 1.0))  # roc_curve's first threshold is +inf


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Binary AUROC (torchmetrics: exact, ties handled, ~6x faster than sklearn's for bootstraps)."""
    if len(np.unique(y)) != 2:
        return math.nan
    # np.array copies: inputs may be read-only views (memory-mapped stores, pandas), which torch warns about
    return float(binary_auroc(torch.from_numpy(np.array(p, dtype=np.float64)),
                              torch.from_numpy(np.array(y, dtype=np.int64))))


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float | str = 0.5, n_bins: int = 10) -> dict:
    """AUROC, accuracy, balanced accuracy, F1, sensitivity, specificity (at ``threshold``), ECE."""
    y = np.asarray(y).astype(int).reshape(-1)
    p = positive_prob(p)
    thr = youden_threshold(y, p) if threshold == "youden" else float(threshold)
    pred = (p >= thr).astype(int)
    pos, neg = y == 1, y == 0
    # confusion-matrix counts directly: this function runs ~1000x per bootstrap, and sklearn's input
    # validation would dominate the cost of these one-liners
    tp, fp = int((pred[pos] == 1).sum()), int((pred[neg] == 1).sum())
    fn = int(pos.sum()) - tp
    sens = tp / pos.sum() if pos.any() else math.nan
    spec = 1 - fp / neg.sum() if neg.any() else math.nan
    return {
        "auroc": _auroc(y, p),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float((sens + spec) / 2) if pos.any() and neg.any() else math.nan,
        "f1": float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0,
        "sensitivity": float(sens),
        "specificity": float(spec),
        "ece": expected_calibration_error(y, p, "binary", n_bins),
        "threshold": thr,
        "n": int(len(y)),
    }


def multiclass_metrics(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict:
    """Macro one-vs-rest AUROC, accuracy, balanced accuracy, macro F1/sensitivity/specificity, top-1 ECE."""
    y = np.asarray(y).astype(int).reshape(-1)
    p = np.asarray(p, dtype=np.float64)
    c = p.shape[1]
    pred = p.argmax(axis=1)
    present = np.unique(y)
    try:
        auroc = float(roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr", average="macro",
                                    labels=np.arange(c))) if len(present) == c else math.nan
    except ValueError:
        auroc = math.nan
    sens = [float((pred[y == k] == k).mean()) for k in present]
    spec = [float((pred[y != k] != k).mean()) for k in present if (y != k).any()]
    return {
        "auroc": auroc,
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, average="macro", labels=present, zero_division=0)),
        "sensitivity": float(np.mean(sens)),
        "specificity": float(np.mean(spec)) if spec else math.nan,
        "ece": expected_calibration_error(y, p, "multiclass", n_bins),
        "n": int(len(y)),
    }


def multilabel_metrics(y: np.ndarray, p: np.ndarray, threshold: float | str | list[float] = 0.5,
                       label_names: list[str] | None = None, n_bins: int = 10) -> dict:
    """Binary metrics per label, macro-averaged (labels with one class in y are left out of AUROC)."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    names = label_names or [str(j) for j in range(y.shape[1])]
    thresholds = threshold if isinstance(threshold, list | tuple) else [threshold] * y.shape[1]
    per = [binary_metrics(y[:, j], p[:, j], thresholds[j], n_bins) for j in range(y.shape[1])]
    out: dict = {}
    for key in ("auroc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "ece"):
        vals = np.array([m[key] for m in per], dtype=np.float64)
        out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
    for name, m in zip(names, per):
        out[f"auroc/{name}"] = m["auroc"]
    out["n"] = int(len(y))
    return out


def classification_metrics(y: np.ndarray, p: np.ndarray, task: str | None = None,
                           threshold: float | str | list[float] = 0.5, label_names: list[str] | None = None,
                           n_bins: int = 10) -> dict:
    """All metrics for one set of predictions; dispatches on ``task`` (inferred when None)."""
    task = task or infer_task(y, p)
    if task == "binary":
        return binary_metrics(y, p, threshold if not isinstance(threshold, list) else threshold[0], n_bins)
    if task == "multiclass":
        return multiclass_metrics(y, p, n_bins)
    if task == "multilabel":
        return multilabel_metrics(y, p, threshold, label_names, n_bins)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def roc_points(y: np.ndarray, p: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve; micro-averaged (all one-vs-rest pairs pooled) for multi-class/label."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if task == "binary":
        yy, pp = y.reshape(-1).astype(int), positive_prob(p)
    elif task == "multiclass":
        yy = np.eye(p.shape[1], dtype=int)[y.astype(int)].reshape(-1)
        pp = p.reshape(-1)
    else:
        yy, pp = y.reshape(-1).astype(int), p.reshape(-1)
    if len(np.unique(yy)) < 2:
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    fpr, tpr, _ = roc_curve(yy, pp)
    return fpr, tpr
