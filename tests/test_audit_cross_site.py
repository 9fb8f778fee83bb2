"""Cross-site matrix: cell metrics equal eval.metrics, CIs bracket them, a planted external drop is seen."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medfm.audit.cross_site import cross_site_matrix
from medfm.errors import MedfmError
from medfm.eval.metrics import binary_metrics


def _preds(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    separation = {("A", "A"): 2.5, ("A", "B"): 0.8, ("B", "B"): 2.5, ("B", "A"): 2.3}
    for (tr, te), sep in separation.items():
        n = 300
        y = rng.integers(0, 2, n)
        logit = (2 * y - 1) * sep / 2 + rng.normal(size=n)
        rows.append(pd.DataFrame({"train_site": tr, "test_site": te, "label": y,
                                  "prob": 1 / (1 + np.exp(-logit)), "patient_id": np.arange(n) // 2}))
    return pd.concat(rows, ignore_index=True)


def test_matrix_cells_and_internal_external_drop():
    df = _preds()
    out = cross_site_matrix(df, thresholds={"A": 0.4}, n_boot=200)
    cells = {(c["train_site"], c["test_site"]): c for c in out["cells"]}
    assert set(cells) == {("A", "A"), ("A", "B"), ("B", "A"), ("B", "B")}
    assert cells[("A", "A")]["internal"] and not cells[("A", "B")]["internal"]
    g = df[(df.train_site == "A") & (df.test_site == "B")]
    ref = binary_metrics(g.label.to_numpy(), g.prob.to_numpy(), 0.4)
    for k in ("auroc", "sensitivity", "specificity", "ece"):
        c = cells[("A", "B")][k]
        assert c["value"] == pytest.approx(ref[k])
        if k != "ece":  # resampled ECE is biased upward, so its percentile CI may sit above the point value
            assert c["lo"] <= c["value"] <= c["hi"]
    drops = {(d["train_site"], d["test_site"]): d["auroc_drop"] for d in out["drops"]}
    assert drops[("A", "B")]["hi"] < -0.1                     # a real drop: CI well below 0
    assert drops[("B", "A")]["value"] > drops[("A", "B")]["hi"]    # the small drop is told apart
    assert out["patient_level"]
    with pytest.raises(MedfmError, match="lacks"):
        cross_site_matrix(df.drop(columns=["prob"]))
