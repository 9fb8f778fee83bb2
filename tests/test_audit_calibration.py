"""Temperature scaling recovers a known over-confidence, lowers ECE, and keeps the ranking."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, softmax
from sklearn.metrics import roc_auc_score

from medfm.audit.calibration import apply_temperature, calibration_audit, fit_temperature, nll
from medfm.errors import MedfmError


def _binary(n: int, seed: int, overconfidence: float = 3.0):
    """Labels drawn from sigmoid(z) (so z is calibrated); the model reports z * overconfidence."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=n)
    y = (rng.uniform(size=n) < expit(z)).astype(int)
    return z * overconfidence, y


def test_fit_recovers_the_planted_temperature_and_matches_a_grid_search():
    z, y = _binary(4000, 0, overconfidence=3.0)
    t = fit_temperature(z, y)
    assert t == pytest.approx(3.0, rel=0.1)
    grid = np.linspace(0.5, 6, 2201)
    assert t == pytest.approx(grid[np.argmin([nll(z, y, g) for g in grid])], abs=0.01)
    # (n, 2) logits [0, z] are the same binary model
    assert fit_temperature(np.c_[np.zeros_like(z), z], y) == pytest.approx(t, rel=1e-3)


def test_multiclass_temperature_and_probabilities():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=2.0, size=(3000, 4))
    y = np.array([rng.choice(4, p=row) for row in softmax(z, axis=1)])
    assert fit_temperature(z * 0.5, y) == pytest.approx(0.5, rel=0.1)   # under-confident model: T < 1
    p = apply_temperature(z, 2.0)
    assert p.shape == (3000, 4) and np.allclose(p.sum(1), 1.0)
    assert (p.argmax(1) == z.argmax(1)).all()


def test_audit_reports_before_after_and_per_group():
    zv, yv = _binary(1500, 2)
    zt, yt = _binary(1500, 3)
    sex = np.where(np.arange(1500) % 2 == 0, "F", "M").astype(object)
    sex[:10] = "X"
    out = calibration_audit(zv, yv, zt, yt, groups={"sex": sex})
    assert out["temperature"] == pytest.approx(3.0, rel=0.15)
    assert out["after"]["ece"] < out["before"]["ece"] / 2
    assert out["after"]["nll"] < out["before"]["nll"]
    bins = out["after"]["bins"]
    assert len(bins["count"]) == 10 and sum(bins["count"]) == 1500
    g = out["by_group"]["sex"]
    assert set(g) == {"F", "M", "X"} and g["X"]["too_small"] and not g["F"]["too_small"]
    assert g["F"]["after"]["ece"] < g["F"]["before"]["ece"]
    # scaling never changes the ranking
    scaled = apply_temperature(zt, out["temperature"])
    assert roc_auc_score(yt, scaled) == pytest.approx(roc_auc_score(yt, zt))
    with pytest.raises(MedfmError, match="labels"):
        fit_temperature(zv, yv[:-1])
