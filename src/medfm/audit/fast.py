"""Plain-numpy binary metrics for the audit's bootstraps (thousands of calls per table).

Each equals its reference (sklearn's roc_auc_score, fairlearn's rates, eval.calibration's torchmetrics ECE);
the reference computes the point values reported, these only the resampled ones: fairlearn's input checks
and torch's per-call overhead would otherwise dominate a bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def fast_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U statistic (ties count half): equal to roc_auc_score, cheaper."""
    from scipy.stats import rankdata

    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    return float((rankdata(p)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fast_ece(y: np.ndarray, p: np.ndarray, n_bins: int) -> float:
    """L1 ECE with torchmetrics' binning (bins [i/n, (i+1)/n), p = 1 in a bin of its own)."""
    if len(y) == 0:
        return math.nan
    idx = np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1), p, side="right") - 1
    count = np.bincount(idx, minlength=n_bins + 1)
    conf = np.bincount(idx, weights=p, minlength=n_bins + 1)
    gap = conf - np.bincount(idx, weights=y, minlength=n_bins + 1)
    return float(np.abs(gap).sum() / count.sum())


def fast_binary_fns(threshold: float, n_bins: int) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """{auroc, fnr, fpr, ece, selection_rate}(y, p): FNR/FPR/selection rate at ``threshold`` on p; NaN where
    a rate is undefined (no positives / negatives)."""
    def rate(hit: np.ndarray, where: np.ndarray) -> float:
        return float(hit[where].mean()) if where.any() else math.nan

    return {
        "auroc": fast_auroc,
        "fnr": lambda y, p: rate(p < threshold, y == 1),
        "fpr": lambda y, p: rate(p >= threshold, y == 0),
        "ece": lambda y, p: fast_ece(y, p, n_bins),
        "selection_rate": lambda y, p: float((p >= threshold).mean()),
    }
