"""Bootstrap confidence intervals, resampling patients (not images) when patient ids are known.

Images of one patient are correlated; resampling them independently gives intervals that are too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def _groups_to_indices(groups: Sequence | None, n: int) -> list[np.ndarray]:
    if groups is None:
        return [np.array([i]) for i in range(n)]
    g = np.asarray([str(x) for x in groups])
    if np.all((g == "") | (g == "nan") | (g == "None")):
        return [np.array([i]) for i in range(n)]
    _, inv = np.unique(g, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    splits = np.cumsum(np.bincount(inv))[:-1]
    return np.split(order, splits)


def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], dict], y: np.ndarray, p: np.ndarray,
                 groups: Sequence | None = None, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """Percentile bootstrap CI of every numeric value ``metric_fn(y, p)`` returns.

    groups: patient ids (one per row); resampling draws whole patients with replacement.
    Returns {metric: {"value", "lo", "hi", "n_boot"}}; resamples where a metric is undefined (e.g. AUROC on a
    one-class resample) are skipped for that metric, and n_boot reports how many were usable.
    """
    y = np.asarray(y)
    p = np.asarray(p)
    point = metric_fn(y, p)
    keys = [k for k, v in point.items() if isinstance(v, int | float) and k not in ("n", "threshold")]
    units = _groups_to_indices(groups, len(y))
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n_boot):
        pick = rng.integers(0, len(units), size=len(units))
        idx = np.concatenate([units[i] for i in pick])
        m = metric_fn(y[idx], p[idx])
        for k in keys:
            v = m.get(k, math.nan)
            if v is not None and math.isfinite(v):
                samples[k].append(float(v))
    out: dict[str, dict[str, float]] = {}
    for k in keys:
        s = np.asarray(samples[k])
        lo, hi = (np.quantile(s, [alpha / 2, 1 - alpha / 2]) if len(s) else (math.nan, math.nan))
        out[k] = {"value": float(point[k]), "lo": float(lo), "hi": float(hi), "n_boot": int(len(s))}
    return out
