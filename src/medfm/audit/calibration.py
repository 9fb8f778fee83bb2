"""Calibration audit: temperature scaling fitted on validation logits, ECE and reliability bins before and
after, overall and per subgroup.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T fitted to minimise the validation
negative log-likelihood; it never changes the ranking (AUROC) or the argmax, only the confidence. ECE and the
reliability bins come from ``medfm.eval.calibration``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit, log_softmax, softmax

from medfm.errors import InputError
from medfm.eval.calibration import expected_calibration_error, reliability_bins


def _logits(z: np.ndarray) -> np.ndarray:
    """(n,) binary logits, or (n, K) multi-class logits; (n, 1) is read as binary."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if not np.isfinite(z).all():
        raise InputError(None, "logits contain NaN or infinite values")
    return z


def _task(z: np.ndarray) -> str:
    return "binary" if z.ndim == 1 or z.shape[1] == 2 else "multiclass"


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels ``y`` under softmax (or sigmoid) of ``logits / temperature``."""
    z, y = _logits(logits) / temperature, np.asarray(y).astype(int).reshape(-1)
    if z.ndim == 1:
        return float(-np.mean(np.where(y == 1, log_expit(z), log_expit(-z))))
    return float(-np.mean(log_softmax(z, axis=1)[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature minimising validation NLL (bounded 1-D search over log T: the NLL is smooth and
    unimodal in it, so this finds the same optimum as LBFGS without a torch graph)."""
    z = _logits(logits)
    y = np.asarray(y).astype(int).reshape(-1)
    if len(y) != len(z):
        raise InputError(None, f"{len(y)} labels for {len(z)} logit rows")
    res = minimize_scalar(lambda t: nll(z, y, float(np.exp(t))), bounds=tuple(np.log(bounds)),
                          method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities after scaling: (n,) P(positive) for binary logits (n,) / (n, 2); (n, K) otherwise."""
    z = _logits(logits) / temperature
    if z.ndim == 1:
        return expit(z)
    p = softmax(z, axis=1)
    return p[:, 1] if p.shape[1] == 2 else p


def _calib(y: np.ndarray, p: np.ndarray, task: str, n_bins: int) -> dict:
    bins = reliability_bins(y, p, task, n_bins)
    return {"ece": expected_calibration_error(y, p, task, n_bins),
            "bins": {k: [None if not np.isfinite(v) else float(v) for v in arr] for k, arr in bins.items()}}


def calibration_audit(val_logits: np.ndarray, val_y: np.ndarray, test_logits: np.ndarray, test_y: np.ndarray,
                      groups: Mapping[str, Sequence | np.ndarray] | None = None, n_bins: int = 10,
                      min_size: int = 30) -> dict:
    """Fit T on validation, then on the test set: ECE, NLL and reliability bins before/after, and per group
    of each attribute in ``groups`` (groups under ``min_size`` cases are flagged ``too_small``)."""
    t = fit_temperature(val_logits, val_y)
    z, y = _logits(test_logits), np.asarray(test_y).astype(int).reshape(-1)
    task = _task(z)
    before, after = apply_temperature(z, 1.0), apply_temperature(z, t)
    out: dict = {"temperature": t, "task": task, "n_bins": n_bins, "n_val": len(np.asarray(val_y)),
                 "n_test": len(y), "before": _calib(y, before, task, n_bins),
                 "after": _calib(y, after, task, n_bins), "by_group": {}}
    out["before"]["nll"], out["after"]["nll"] = nll(z, y), nll(z, y, t)
    for attr, values in (groups or {}).items():
        g = np.asarray(values, dtype=object).astype(str)
        if len(g) != len(y):
            raise InputError(None, f"attribute {attr!r} has {len(g)} values for {len(y)} test cases")
        rows = {}
        for name in sorted(set(g)):
            m = g == name
            rows[name] = {"n": int(m.sum()), "too_small": bool(m.sum() < min_size),
                          "before": _calib(y[m], before[m], task, n_bins),
                          "after": _calib(y[m], after[m], task, n_bins)}
        out["by_group"][attr] = rows
    return out
