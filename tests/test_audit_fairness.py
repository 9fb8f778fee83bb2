"""Fairness audit: numbers equal fairlearn's, small groups flagged, a planted FNR gap is recovered."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fairlearn.metrics import (
    demographic_parity_difference,
    equalized_odds_difference,
    false_negative_rate,
    false_positive_rate,
)
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from medfm.audit.fairness import (
    _metric_fns,
    age_bands,
    fairness_audit,
    fairness_for_attribute,
    subgroup_metrics,
)
from medfm.audit.fast import fast_binary_fns
from medfm.errors import MedfmError
from medfm.eval.calibration import expected_calibration_error


def _cohort(n: int, seed: int, flip_group: str | None = None, flip_rate: float = 0.0):
    """Positives score N(+2, 1), negatives N(-2, 1) on the logit scale; threshold 0.5 = logit 0.

    flip_group: in that group a ``flip_rate`` share of positives get a negative's score, as a model does
    that learned from labels where those positives had been recorded as negative.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    group = rng.choice(np.array(["A", "B"], dtype=object), n)
    logit = np.where(y == 1, 2.0, -2.0) + rng.normal(size=n)
    if flip_group is not None:
        hit = (group == flip_group) & (y == 1) & (rng.uniform(size=n) < flip_rate)
        logit[hit] = -2.0 + rng.normal(size=hit.sum())
    return y, 1 / (1 + np.exp(-logit)), group


def test_age_bands():
    bands = age_bands([5, 18, 39.9, 40, 79, 80, 101, None, "n/a", -1, "62"])
    assert bands.tolist() == ["0-17", "18-39", "18-39", "40-59", "60-79", "80+", "80+", "unknown", "unknown",
                              "unknown", "60-79"]
    assert age_bands([30, 70], edges=(0, 65)).tolist() == ["0-64", "65+"]


def test_numbers_equal_fairlearn_and_reference_metrics():
    y, p, g = _cohort(600, 0)
    g[:40] = "C"
    table = subgroup_metrics(y, p, g)
    for name in ("A", "B", "C"):
        m = g == name
        assert table.loc[name, "fnr"] == pytest.approx(false_negative_rate(y[m], p[m] >= 0.5))
        assert table.loc[name, "fpr"] == pytest.approx(false_positive_rate(y[m], p[m] >= 0.5))
        assert table.loc[name, "auroc"] == pytest.approx(roc_auc_score(y[m], p[m]))
        assert table.loc[name, "ece"] == pytest.approx(expected_calibration_error(y[m], p[m], "binary"))
        assert table.loc[name, "n"] == m.sum()
    out = fairness_for_attribute(y, p, g, min_size=30, n_boot=50)
    pred = (p >= 0.5).astype(int)
    assert out["equalized_odds_difference"] == pytest.approx(equalized_odds_difference(y, pred,
                                                                                      sensitive_features=g))
    assert out["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(y, pred, sensitive_features=g))
    # the bootstrap's fast metric versions agree with the reported ones
    fast, ref = fast_binary_fns(0.5, 10), _metric_fns(0.5, 10)
    for k in fast:
        assert fast[k](y, p) == pytest.approx(ref[k](y, p), abs=1e-6), k


def test_small_groups_are_flagged_not_ranked_and_left_out_of_differences():
    y, p, g = _cohort(600, 1)
    g[:12] = "tiny"
    g[12:20] = ""                                       # missing values form an "unknown" group
    out = fairness_for_attribute(y, p, g, min_size=30, n_boot=30)
    rows = {r["group"]: r for r in out["groups"]}
    assert set(rows) == {"A", "B", "tiny", "unknown"}
    assert rows["tiny"]["too_small"] and rows["tiny"]["fnr_rank"] is None
    assert sorted(rows[k]["fnr_rank"] for k in ("A", "B")) == [1, 2]
    big = np.isin(g, ["A", "B"])
    pred = (p >= 0.5).astype(int)
    assert out["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(y[big], pred[big], sensitive_features=g[big]))
    one = fairness_for_attribute(y, p, np.where(big, "A", "tiny"), min_size=10_000, n_boot=5)
    assert one["reference"] is None and math.isnan(one["equalized_odds_difference"])
    with pytest.raises(MedfmError, match="lengths"):
        fairness_for_attribute(y, p[:-1], g)


def test_planted_label_flip_gives_the_expected_fnr_gap_with_ci_excluding_zero():
    rate = 0.3
    y, p, g = _cohort(3000, 2, flip_group="B", flip_rate=rate)
    patients = np.arange(len(y)) // 2                    # two images per patient: patient-level bootstrap
    out = fairness_audit(y, p, {"group": g}, patient_ids=patients, n_boot=200, seed=0)["group"]
    # unflipped positives miss with P(N(2,1) < 0) = Phi(-2); flipped ones now score like negatives and miss
    # with Phi(2), so FNR_B - FNR_A = rate * (Phi(2) - Phi(-2)) = 0.286
    expected_gap = rate * (norm.cdf(2.0) - norm.cdf(-2.0))
    rows = {r["group"]: r for r in out["groups"]}
    ref = out["reference"]                               # the larger group; flip the sign if it is B
    sign = 1.0 if ref == "A" else -1.0
    gap = rows["B" if ref == "A" else "A"]["gap"]["fnr"]
    print("FNR gap", gap, "expected", sign * expected_gap)
    assert abs(gap["value"] - sign * expected_gap) <= 0.05
    assert gap["lo"] > 0 if sign > 0 else gap["hi"] < 0
    explicit = fairness_for_attribute(y, p, g, patient_ids=patients, reference="A", n_boot=50)
    b = next(r for r in explicit["groups"] if r["group"] == "B")
    assert b["gap"]["fnr"]["value"] == pytest.approx(expected_gap, abs=0.05) and b["gap"]["fnr"]["lo"] > 0
    assert rows["B"]["fnr_rank"] == 1
    fnr_b = rows["B"]["fnr"]
    assert out["patient_level"] and fnr_b["lo"] < fnr_b["value"] < fnr_b["hi"]
