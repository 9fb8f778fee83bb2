"""audit.json assembly: JSON-clean, identifiers dropped, findings name what the sections found."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medfm.audit.fairness import fairness_for_attribute
from medfm.audit.report import assemble_audit, to_jsonable
from medfm.audit.shift import mmd_test, shift_suite
from medfm.errors import MedfmError


def test_to_jsonable_cleans_numpy_nan_and_identifiers():
    obj = {"a": np.float32(1.5), "b": np.array([1, 2]), "c": float("nan"), "d": np.bool_(True),
           "patient_id": "P123", "nested": [{"path": "/data/x.dcm", "score": np.inf}],
           "r": mmd_test(np.zeros((5, 2)), np.ones((5, 2)), n_perm=10)}
    out = to_jsonable(obj)
    json.dumps(out, allow_nan=False)
    assert out["a"] == 1.5 and out["b"] == [1, 2] and out["c"] is None and out["d"] is True
    assert "patient_id" not in out and out["nested"] == [{"score": None}]
    assert out["r"]["test"] == "mmd" and "detected" in out["r"]


def test_assemble_audit_sections_and_findings():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)), rng.normal(size=(60, 4)) + 1.5
    shift = {"site_a_vs_site_b": shift_suite(x, y, n_perm=50, pca_components=None, sample_size=False)}
    n = 800
    lab = rng.integers(0, 2, n)
    grp = rng.choice(np.array(["F", "M"], dtype=object), n)
    logit = np.where(lab == 1, 2.0, -2.0) + rng.normal(size=n)
    logit[(grp == "F") & (lab == 1) & (rng.uniform(size=n) < 0.4)] = -2.0
    fair = {"sex": fairness_for_attribute(lab, 1 / (1 + np.exp(-logit)), grp, reference="M", n_boot=100)}
    doc = assemble_audit(model={"kind": "classifier"}, settings={"alpha": 0.05}, shift=shift, fairness=fair,
                         shortcuts={"site": {"predictable": True,
                                             "auroc": {"value": 0.9, "lo": 0.85, "hi": 0.95}}})
    json.dumps(doc, allow_nan=False)
    assert doc["schema"] == "medfm.audit/1" and doc["sections"] == ["shift", "fairness", "shortcuts"]
    text = "\n".join(doc["findings"])
    assert "shift site_a_vs_site_b: detected by" in text and "mmd" in text
    assert "fairness sex=F: FNR higher than M" in text
    assert "shortcut: site predictable" in text
    with pytest.raises(MedfmError, match="unknown audit section"):
        assemble_audit(fairnes=fair)


def test_findings_state_gaps_and_drops_as_positive_sizes_with_ordered_cis():
    """A negative FNR gap reads "lower by 0.4 [0.2, 0.6]", never "lower by -0.4"; an AUROC drop likewise."""
    import re

    from medfm.audit.report import summarize_findings
    from medfm.audit.run import extra_findings

    gap = {"value": -0.4, "lo": -0.6, "hi": -0.2}
    doc = {"fairness": {"sex": {"reference": "M", "min_size": 30,
                                "groups": [{"group": "F", "gap": {"fnr": gap}, "too_small": False}]}},
           "cross_site": {"by_dataset": {"drops": [{"train_site": "a", "test_site": "b", "auroc_drop": {
               "value": -0.3, "lo": -0.41, "hi": -0.18}}]}}}
    lines = summarize_findings(doc) + extra_findings(doc)
    fair = next(x for x in lines if x.startswith("fairness sex=F"))
    drop = next(x for x in lines if x.startswith("cross-site a -> b"))
    assert "lower than M by 0.400 [0.200, 0.600]" in fair and "-" not in fair.split("by")[1]
    assert "drops by 0.300 [0.180, 0.410]" in drop
    for text in (fair, drop):
        lo, hi = map(float, re.search(r"\[([\d.]+), ([\d.]+)\]", text).groups())
        assert lo <= hi
