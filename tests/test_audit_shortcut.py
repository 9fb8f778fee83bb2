"""Shortcut probes: an encoded attribute is flagged, a random one is not, patient-grouped folds stop leaks."""

from __future__ import annotations

import numpy as np

from medfm.audit.shortcut import attribute_probe, paired_auroc_change, shortcut_audit


def test_encoded_site_is_predictable_and_random_attribute_is_not():
    rng = np.random.default_rng(0)
    n = 600
    site = rng.choice(np.array(["north", "south"], dtype=object), n)
    feats = rng.normal(size=(n, 16))
    feats[:, 0] += np.where(site == "north", 1.5, -1.5)           # the encoder carries the site
    noise = rng.choice(np.array(["a", "b"], dtype=object), n)
    out = shortcut_audit(feats, {"site": site, "noise": noise,
                                 "age": rng.uniform(20, 90, n)}, n_boot=100)
    assert out["site"]["predictable"] and out["site"]["auroc"]["value"] > 0.9
    assert not out["noise"]["predictable"]
    assert out["noise"]["auroc"]["lo"] < 0.5 < out["noise"]["auroc"]["hi"]
    assert set(out["age"]["classes"]) <= {"18-39", "40-59", "60-79", "80+"}   # age was banded
    assert not out["age"]["predictable"]


def test_patient_grouped_folds_stop_the_probe_recognising_patients():
    rng = np.random.default_rng(1)
    n_pat, per = 80, 5
    pat_vec = rng.normal(size=(n_pat, 40))
    feats = np.repeat(pat_vec, per, axis=0) + 0.05 * rng.normal(size=(n_pat * per, 40))
    attr = np.repeat(rng.choice(np.array(["F", "M"], dtype=object), n_pat), per)   # unrelated to features
    pids = np.repeat(np.arange(n_pat), per)
    leaky = attribute_probe(feats, attr, None, C=100.0, n_boot=50)
    grouped = attribute_probe(feats, attr, pids, C=100.0, n_boot=50)
    assert leaky["auroc"]["value"] > 0.8                    # memorised patients, not the attribute
    assert grouped["patient_grouped"] and not grouped["predictable"]
    assert grouped["auroc"]["lo"] < 0.5 + 0.05


def test_multiclass_unknown_and_rare_classes():
    rng = np.random.default_rng(2)
    n = 400
    site = rng.choice(np.array(["s1", "s2", "s3"], dtype=object), n)
    code = np.searchsorted(["s1", "s2", "s3"], site)
    feats = rng.normal(size=(n, 8)) + (code[:, None] == np.arange(8)) * 2.0
    site[:7] = ""
    site[7:10] = "rare"
    out = attribute_probe(feats, site, n_boot=50)
    assert out["classes"] == ["s1", "s2", "s3"] and out["n_excluded"] == 10
    assert out["predictable"] and out["auroc"]["value"] > 0.85
    assert attribute_probe(feats, np.full(n, "one", dtype=object))["note"]


def test_paired_auroc_change_with_anatomy_blanked():
    rng = np.random.default_rng(3)
    n = 800
    y = rng.integers(0, 2, n)
    original = y * 2.0 + rng.normal(size=n)
    uses_other_cue = y * 1.0 + rng.normal(size=n)        # weaker, but still well above chance
    nothing_left = rng.normal(size=n)
    a = paired_auroc_change(y, original, uses_other_cue, patient_ids=np.arange(n) // 2, n_boot=200)
    assert a["still_above_chance"] and a["difference"]["hi"] < 0
    b = paired_auroc_change(y, original, nothing_left, n_boot=200)
    assert not b["still_above_chance"] and b["modified"]["lo"] < 0.5 < b["modified"]["hi"]
