"""OOD scores: agree with reference computations, separate foreign from training data, thresholds hold."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from scipy.special import logsumexp

from medfm.audit.ood import (
    energy_score,
    fit_gaussian,
    fit_threshold,
    knn_score,
    mahalanobis_score,
    most_atypical,
    ood_audit,
    ood_auroc,
)
from medfm.errors import MedfmError


def _cohort(n: int, seed: int, offset: float = 0.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    centres = np.array([[5.0, 0, 0, 0, 0, 0], [-5.0, 0, 0, 0, 0, 0]])
    x = centres[y] + rng.normal(size=(n, 6)) * np.r_[1.0, 1.0, 0.5, 0.5, 0.2, 0.2] + offset
    return x, y


def test_mahalanobis_matches_scipy_with_empirical_covariance():
    x, _ = _cohort(300, 0)
    g = fit_gaussian(x, shrinkage=False)
    q = x[:5] + 0.3
    vi = np.linalg.inv(np.cov(x, rowvar=False, bias=True))
    ref = [mahalanobis(r, x.mean(0), vi) ** 2 for r in q]
    assert mahalanobis_score(g, q) == pytest.approx(ref, rel=1e-6)


def test_class_conditional_beats_single_gaussian_between_clusters():
    x, y = _cohort(400, 1)
    between = np.zeros((50, 6))                  # the empty middle between the two class clusters
    g1, g2 = fit_gaussian(x), fit_gaussian(x, y)
    assert ood_auroc(mahalanobis_score(g2, x), mahalanobis_score(g2, between)) > 0.95
    assert ood_auroc(mahalanobis_score(g1, x), mahalanobis_score(g1, between)) < 0.5


def test_energy_and_knn_match_reference_computations():
    logits = np.random.default_rng(2).normal(size=(20, 3))
    assert energy_score(logits, 2.0) == pytest.approx(-2.0 * logsumexp(logits / 2.0, axis=1))
    assert energy_score(np.array([0.0])) == pytest.approx([-np.log(2.0)])
    from sklearn.neighbors import NearestNeighbors

    ref, q = _cohort(200, 3)[0], _cohort(30, 4)[0]
    d, _ = NearestNeighbors(n_neighbors=4, metric="cosine").fit(ref).kneighbors(q)
    assert knn_score(ref, q, k=4, chunk=7) == pytest.approx(d[:, -1], abs=1e-9)
    d_self, _ = NearestNeighbors(n_neighbors=4, metric="cosine").fit(ref).kneighbors(ref)
    assert knn_score(ref, ref, k=3, exclude_self=True) == pytest.approx(d_self[:, -1], abs=1e-9)


def test_threshold_flags_about_five_percent_of_new_in_distribution_cases():
    train, ytr = _cohort(600, 5)
    val, _ = _cohort(400, 6)
    fresh, _ = _cohort(2000, 7)
    g = fit_gaussian(train, ytr)
    thr = fit_threshold(mahalanobis_score(g, val), 0.95)
    rate = (mahalanobis_score(g, fresh) > thr).mean()
    assert 0.02 <= rate <= 0.09     # 5 % +- sampling error of a 400-case quantile
    with pytest.raises(MedfmError):
        fit_threshold(np.ones(3), 1.5)


def test_audit_separates_foreign_data_and_ranks_atypical_cases():
    train, ytr = _cohort(500, 8)
    val, _ = _cohort(200, 9)
    foreign, _ = _cohort(200, 10, offset=1.5)
    foreign[3] += 25.0                                  # one blatantly foreign case
    w = np.zeros((6, 2))
    w[0] = [1.0, -1.0]          # confident logits in distribution, flat ones on the foreign set
    out = ood_audit(train, val, foreign, ytr, val_logits=val @ w, target_logits=foreign @ w * 0.05,
                    target_ids=[f"c{i}" for i in range(200)], top=5)
    assert set(out["scores"]) == {"mahalanobis", "knn", "energy"}
    for name in ("mahalanobis", "knn", "energy"):
        assert out["scores"][name]["auroc"] > 0.8, name
        assert 0.0 <= out["scores"][name]["val_flagged_fraction"] <= 0.06
    top = out["scores"]["mahalanobis"]["most_atypical"]
    assert top[0]["index"] == 3 and top[0]["case_id"] == "c3" and top[0]["flagged"]
    assert [r["score"] for r in top] == sorted((r["score"] for r in top), reverse=True)
    monitor = ood_audit(train, val, val, target_is_foreign=False)
    assert "auroc" not in monitor["scores"]["knn"]
    assert most_atypical(np.array([1.0, 3.0, 2.0]), top=2)[1]["index"] == 2
