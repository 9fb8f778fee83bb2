"""Calibration: expected calibration error (torchmetrics) and reliability-diagram bins."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error


def expected_calibration_error(y: np.ndarray, p: np.ndarray, task: str, n_bins: int = 10) -> float:
    """ECE (L1, equal-width bins). Binary: p = P(y=1); multiclass: p (n, C); multilabel: mean over labels."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float32)
    if task == "binary":
        return float(binary_calibration_error(torch.from_numpy(p), torch.from_numpy(y.astype(np.int64)),
                                              n_bins=n_bins))
    if task == "multiclass":
        return float(multiclass_calibration_error(torch.from_numpy(p), torch.from_numpy(y.astype(np.int64)),
                                                  num_classes=p.shape[1], n_bins=n_bins))
    if task == "multilabel":
        return float(np.mean([expected_calibration_error(y[:, j], p[:, j], "binary", n_bins)
                              for j in range(y.shape[1])]))
    raise ValueError(f"unknown task {task!r}")


def reliability_bins(y: np.ndarray, p: np.ndarray, task: str, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Per-bin mean confidence, accuracy and count, for a reliability diagram.

    Binary and multilabel use P(positive) against the observed positive rate (labels pooled for multilabel);
    multiclass uses the top-label confidence against top-label accuracy.
    """
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if task == "multiclass":
        conf = p.max(axis=1)
        hit = (p.argmax(axis=1) == y).astype(np.float64)
    else:
        conf = p.reshape(-1)
        hit = y.reshape(-1).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        frac_pos = np.bincount(idx, weights=hit, minlength=n_bins) / count
    return {"edges": edges, "confidence": mean_conf, "observed": frac_pos, "count": count}
