"""Shift tests: exact MMD arithmetic, false-positive rate on same-site splits, power on a clear shift.

False-positive budget, stated honestly: an exactly calibrated test at alpha = 0.05 rejects a random
same-site split with probability 0.05, so over N splits its rejection count is Binomial(N, 0.05); we allow
the count the 95th percentile of that distribution allows (``fpr_bound``: 3 of 20, 4 of 40). The data are
seeded, so the counts are deterministic, and the observed counts are printed.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from medfm.audit.shift import (
    classifier_shift_test,
    detection_sample_size,
    fpr_bound,
    ks_test,
    mmd_test,
    predicted_class_shift_test,
    shift_suite,
    softmax_shift_test,
)
from medfm.errors import MedfmError


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


TESTS = {
    "mmd": lambda a, b, s: mmd_test(a, b, n_perm=100, seed=s),
    "ks": lambda a, b, s: ks_test(a, b),
    "ks_pca": lambda a, b, s: ks_test(a, b, pca_components=5),
    "domain_classifier": lambda a, b, s: classifier_shift_test(a, b, seed=s),
    # the suite's overall verdict (Bonferroni over its tests) must keep the same false-positive rate
    "suite": lambda a, b, s: SimpleNamespace(detected=shift_suite(
        a, b, _sigmoid(a[:, 0]), _sigmoid(b[:, 0]), n_perm=50, pca_components=4, sample_size=False,
        seed=s)["any_detected"]),
}


def _null_rejections(pool: np.ndarray, n_splits: int, test, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    hits = 0
    for s in range(n_splits):
        idx = rng.permutation(len(pool))
        half = len(pool) // 2
        hits += test(pool[idx[:half]], pool[idx[half:]], s).detected
    return hits


def test_mmd_statistic_matches_direct_unbiased_estimate():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(40, 4))
    sigma = 1.7

    def k(a, b):
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma**2))

    m, n = len(x), len(y)
    direct = ((k(x, x).sum() - m) / (m * (m - 1)) + (k(y, y).sum() - n) / (n * (n - 1))
              - 2 * k(x, y).mean())
    assert mmd_test(x, y, bandwidth=sigma, n_perm=10).statistic == pytest.approx(direct, rel=1e-9)
    capped = mmd_test(x, y, n_perm=10, max_per_side=20)
    assert capped.details["n_used"] == [20, 20] and capped.n_source == 30


@pytest.mark.parametrize("name", sorted(TESTS))
def test_false_positive_rate_on_same_site_gaussian_splits(name):
    pool = np.random.default_rng(7).normal(size=(160, 8))
    hits = _null_rejections(pool, 40, TESTS[name])
    print(f"{name}: {hits}/40 same-site splits rejected at alpha=0.05")
    assert hits <= fpr_bound(40) == 4


def test_false_positive_rate_on_real_image_embeddings(data_dir):
    from sklearn.decomposition import PCA

    imgs = np.load(data_dir / "medmnist" / "breastmnist.npz")["train_images"]
    feats = PCA(16, random_state=0).fit_transform(imgs.reshape(len(imgs), -1) / 255.0)
    for name in ("mmd", "ks", "domain_classifier"):
        hits = _null_rejections(feats, 40, TESTS[name])
        print(f"breastmnist {name}: {hits}/40 same-set splits rejected")
        assert hits <= fpr_bound(40) == 4


def test_clear_mean_shift_is_detected_and_sized():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8))
    y = rng.normal(size=(300, 8)) + np.r_[0.8, np.zeros(7)]   # shift along one axis only
    for name, t in TESTS.items():
        r = t(x, y, 0)
        assert r.detected, (name, r.p_value)
    size = detection_sample_size(x, y, mmd_test, n_rep=10, n_perm=100)
    assert size["n_needed"] is not None and size["n_needed"] <= 100
    assert max(size["power"].values()) >= 0.8
    # a larger shift needs fewer cases
    smaller = detection_sample_size(x, y * 1.0 + np.r_[1.5, np.zeros(7)], mmd_test, n_rep=10, n_perm=100)
    assert smaller["n_needed"] <= size["n_needed"]


def test_output_shift_tests_on_softmax_and_predicted_class():
    rng = np.random.default_rng(4)
    logit_s, logit_t = rng.normal(size=300), rng.normal(size=300) + 1.0
    ps, pt = 1 / (1 + np.exp(-logit_s)), 1 / (1 + np.exp(-logit_t))
    assert softmax_shift_test(ps, pt).detected
    assert predicted_class_shift_test(ps, pt).detected
    same = 1 / (1 + np.exp(-rng.normal(size=300)))
    assert softmax_shift_test(ps, same).p_value > 0.05
    r = predicted_class_shift_test(np.c_[np.ones(5), np.zeros(5)], np.c_[np.ones(5), np.zeros(5)])
    assert r.p_value == 1.0 and not r.detected


def test_shift_suite_reports_every_test():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(80, 6)), rng.normal(size=(80, 6)) + 1.0
    out = shift_suite(x, y, rng.uniform(size=80), rng.uniform(size=80), n_perm=50, pca_components=3)
    assert {"mmd", "ks", "domain_classifier", "softmax_ks", "predicted_class"} <= set(out)
    assert out["any_detected"] and out["mmd"]["detected"]
    assert out["mmd"]["sample_size"]["n_needed"] is not None
    with pytest.raises(MedfmError, match="dimensions"):
        mmd_test(x, y[:, :3])
