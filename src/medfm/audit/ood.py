"""Per-case out-of-distribution scores; higher always means "less like the training data".

- Mahalanobis distance on encoder features (Lee et al. 2018): one Gaussian, or class-conditional means with a
  shared covariance (the score is the distance to the nearest class mean); Ledoit-Wolf shrinkage keeps the
  covariance invertible when features outnumber cases.
- Energy score from logits (Liu et al. 2020): E(x) = -T logsumexp(f(x) / T).
- kNN distance (Sun et al. 2022): cosine distance to the k-th nearest training feature.

Thresholds are set on in-distribution *validation* cases (never the training cases, whose kNN and
Mahalanobis scores are optimistically small), at a quantile such as 95 %: about 5 % of new in-distribution
cases are then flagged, by construction. Score the full embedding: a PCA fitted on the training data
discards the directions in which foreign data differ (on X-ray pixels, ultrasound AUROC fell from 0.98
to 0.85 with 16 components; tests/test_audit_real.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from medfm.errors import ConfigError, InputError


def _feats(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    a = a.reshape(len(a), -1)
    if not np.isfinite(a).all():
        raise InputError(None, "features contain NaN or infinite values")
    return a


@dataclass
class Gaussian:
    """Fitted class means (one row per class; one row when fitted without labels) and shared precision."""

    means: np.ndarray
    precision: np.ndarray
    classes: list


def fit_gaussian(features: np.ndarray, labels: np.ndarray | None = None, shrinkage: bool = True) -> Gaussian:
    """Fit the Mahalanobis model. labels: class-conditional means with a covariance shared by the classes
    (pooled within-class scatter); None: a single Gaussian. shrinkage: Ledoit-Wolf, else empirical."""
    from sklearn.covariance import EmpiricalCovariance, LedoitWolf

    x = _feats(features)
    if labels is None:
        classes: list = [None]
        means = x.mean(0, keepdims=True)
        centred = x - means
    else:
        labels = np.asarray(labels)
        if len(labels) != len(x):
            raise InputError(None, f"{len(labels)} labels for {len(x)} feature rows")
        classes = sorted(np.unique(labels).tolist())
        means = np.stack([x[labels == c].mean(0) for c in classes])
        centred = x - means[np.searchsorted(classes, labels)]
    est = (LedoitWolf if shrinkage else EmpiricalCovariance)(assume_centered=True).fit(centred)
    return Gaussian(means=means, precision=est.precision_, classes=classes)


def mahalanobis_score(model: Gaussian, features: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest class mean, per case."""
    x = _feats(features)
    d = x[:, None, :] - model.means[None, :, :]                     # (n, C, D)
    return np.einsum("ncd,de,nce->nc", d, model.precision, d).min(1)


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Energy -T logsumexp(logits / T) per case. Binary logits of shape (n,) are read as [0, logit]."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = np.c_[np.zeros_like(z), z]
    return -temperature * logsumexp(z / temperature, axis=1)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def knn_score(reference: np.ndarray, features: np.ndarray, k: int = 5, exclude_self: bool = False,
              chunk: int = 1024) -> np.ndarray:
    """Cosine distance from each case to its k-th nearest reference (training) feature.

    exclude_self: the queried cases are the reference set itself; skip each one's own match.
    """
    ref, q = _unit(_feats(reference)), _unit(_feats(features))
    kk = k + int(exclude_self)
    if kk > len(ref):
        raise ConfigError(f"k={k} needs more than {len(ref)} reference cases")
    out = np.empty(len(q))
    for s in range(0, len(q), chunk):  # chunks bound memory at chunk x n_reference similarities
        sim = q[s:s + chunk] @ ref.T
        out[s:s + chunk] = 1.0 - np.partition(sim, -kk, axis=1)[:, -kk]
    return out


def fit_threshold(id_scores: np.ndarray, quantile: float = 0.95) -> float:
    """Score above which a case is flagged: the ``quantile`` of in-distribution validation scores."""
    s = np.asarray(id_scores, dtype=np.float64)
    if not 0 < quantile < 1 or len(s) == 0:
        raise ConfigError("need a quantile in (0, 1) and at least one validation score")
    return float(np.quantile(s, quantile, method="higher"))


def ood_auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """AUROC of the score for telling foreign (positive) from in-distribution cases."""
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(id_scores, float), np.asarray(ood_scores, float)
    return float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))


def most_atypical(scores: np.ndarray, top: int = 20, threshold: float | None = None,
                  case_ids: Sequence | None = None) -> list[dict]:
    """The ``top`` highest-scoring cases, most atypical first: {"index", "score", "flagged"[, "case_id"]}."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")[:top]
    rows = []
    for i in order:
        row = {"index": int(i), "score": float(s[i]),
               "flagged": bool(threshold is not None and s[i] > threshold)}
        if case_ids is not None:
            row["case_id"] = case_ids[i]
        rows.append(row)
    return rows


def ood_scores(train_features: np.ndarray, features: np.ndarray, train_labels: np.ndarray | None = None,
               logits: np.ndarray | None = None, k: int = 5, gaussian: Gaussian | None = None,
               ) -> dict[str, np.ndarray]:
    """Every available score for ``features`` (and ``logits``) against the training features."""
    g = gaussian or fit_gaussian(train_features, train_labels)
    out = {"mahalanobis": mahalanobis_score(g, features), "knn": knn_score(train_features, features, k)}
    if logits is not None:
        out["energy"] = energy_score(logits)
    return out


def score_summary(val: dict[str, np.ndarray], target: dict[str, np.ndarray], quantile: float = 0.95,
                  top: int = 20, target_ids: Sequence | None = None, target_is_foreign: bool = True
                  ) -> dict[str, dict]:
    """Per score both :func:`ood_scores` dicts hold: the threshold on ``val``, the share of val and target
    cases above it, the most atypical target cases and (foreign target) AUROC(val vs target)."""
    out: dict[str, dict] = {}
    for name in target:
        if name not in val:
            continue
        thr = fit_threshold(val[name], quantile)
        entry = {"threshold": thr, "flagged_fraction": float((target[name] > thr).mean()),
                 "val_flagged_fraction": float((val[name] > thr).mean()),
                 "most_atypical": most_atypical(target[name], top, thr, target_ids)}
        if target_is_foreign:
            entry["auroc"] = ood_auroc(val[name], target[name])
        out[name] = entry
    return out


def ood_audit(train_features: np.ndarray, val_features: np.ndarray, target_features: np.ndarray,
              train_labels: np.ndarray | None = None, val_logits: np.ndarray | None = None,
              target_logits: np.ndarray | None = None, quantile: float = 0.95, k: int = 5, top: int = 20,
              target_ids: Sequence | None = None, target_is_foreign: bool = True) -> dict:
    """Per score: threshold on the validation set, share of target cases flagged, AUROC(val vs target)
    when the target is a foreign dataset, and the most atypical target cases (:func:`score_summary`).

    With ``target_is_foreign=False`` (monitoring a new batch, no labels) no AUROC is reported.
    """
    g = fit_gaussian(train_features, train_labels)
    val = ood_scores(train_features, val_features, train_labels, val_logits, k, g)
    tgt = ood_scores(train_features, target_features, train_labels, target_logits, k, g)
    return {"quantile": quantile, "k": k, "n_val": len(val["knn"]), "n_target": len(tgt["knn"]),
            "class_conditional": train_labels is not None,
            "scores": score_summary(val, tgt, quantile, top, target_ids, target_is_foreign)}
