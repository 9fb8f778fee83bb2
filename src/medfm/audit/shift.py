"""Dataset-shift tests between a source and a target set of embeddings or model outputs.

The three families of "Failing Loudly" (Rabanser et al. 2019): a kernel two-sample test (MMD), univariate
KS tests with Bonferroni correction (optionally on PCA-reduced features), and classifier-based tests (a
domain classifier's held-out AUROC; KS / chi-square on the model's softmax outputs and predicted classes).
Every test returns a :class:`ShiftResult`; :func:`detection_sample_size` estimates how many cases per side a
test needs to see the shift.

Validity under "no shift" is by construction, not by asymptotics where it can be: the MMD bandwidth and the
PCA projection are fitted on the pooled data (a symmetric function of it), so the permutation / rank tests
stay exact when source and target are exchangeable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from medfm.errors import InputError

ShiftTest = Callable[..., "ShiftResult"]


@dataclass
class ShiftResult:
    """One shift test: statistic, p-value, and whether it rejects "no shift" at ``alpha``."""

    test: str
    statistic: float
    p_value: float
    alpha: float
    n_source: int
    n_target: int
    details: dict = field(default_factory=dict)

    @property
    def detected(self) -> bool:
        return bool(self.p_value < self.alpha)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["detected"] = self.detected
        return d


def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0 or a.size == 0:
        raise InputError(None, f"no cases to compare (an array of shape {a.shape})")
    return a.reshape(len(a), -1)


def _check_pair(x: np.ndarray, y: np.ndarray, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_2d(x), _as_2d(y)
    if x.shape[1] != y.shape[1]:
        raise InputError(None, f"source has {x.shape[1]} dimensions, target {y.shape[1]}")
    if len(x) < min_n or len(y) < min_n:
        raise InputError(None, f"need at least {min_n} cases per side (got {len(x)} and {len(y)})")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise InputError(None, "features contain NaN or infinite values")
    return x, y


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(z: np.ndarray, max_points: int = 1000, seed: int = 0) -> float:
    """Median pairwise Euclidean distance (the median heuristic), on at most ``max_points`` rows."""
    z = _as_2d(z)
    if len(z) > max_points:
        z = z[np.random.default_rng(seed).choice(len(z), max_points, replace=False)]
    d = _sq_dists(z, z)[np.triu_indices(len(z), k=1)]
    med = float(np.sqrt(np.median(d))) if len(d) else 1.0
    return med if med > 0 else 1.0


def _mmd2_from_kernel(k: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Unbiased MMD² for each column of the 0/1 membership matrix ``z`` (1 = source), kernel diag = 1."""
    m = z.sum(0)
    n = len(z) - m
    kz = k @ z
    s_xx = (z * kz).sum(0)                      # sum over source pairs, incl. diagonal
    s_all = k.sum()
    s_xy = kz.sum(0) - s_xx                     # source rows against target columns
    s_yy = s_all - 2 * s_xy - s_xx
    return (s_xx - m) / (m * (m - 1)) + (s_yy - n) / (n * (n - 1)) - 2 * s_xy / (m * n)


def mmd_test(x: np.ndarray, y: np.ndarray, alpha: float = 0.05, n_perm: int = 200,
             bandwidth: float | None = None, max_per_side: int = 2000, seed: int = 0) -> ShiftResult:
    """MMD² (unbiased, RBF kernel with median-heuristic bandwidth) with a permutation test.

    p = (1 + #{permuted MMD² >= observed}) / (1 + n_perm), exact under exchangeability. Sides larger than
    ``max_per_side`` are randomly subsampled to it (the kernel matrix is quadratic in memory).
    """
    x, y = _check_pair(x, y)
    rng = np.random.default_rng(seed)
    n_full = (len(x), len(y))
    x = x[rng.choice(len(x), max_per_side, replace=False)] if len(x) > max_per_side else x
    y = y[rng.choice(len(y), max_per_side, replace=False)] if len(y) > max_per_side else y
    pooled = np.vstack([x, y])
    sigma = bandwidth or median_bandwidth(pooled, seed=seed)
    k = np.exp(-_sq_dists(pooled, pooled) / (2 * sigma**2))
    labels = np.zeros((len(pooled), 1 + n_perm))
    labels[: len(x), 0] = 1.0
    for j in range(1, n_perm + 1):
        labels[rng.permutation(len(pooled))[: len(x)], j] = 1.0
    mmd2 = _mmd2_from_kernel(k, labels)
    obs = float(mmd2[0])
    p = (1 + int((mmd2[1:] >= obs - 1e-12).sum())) / (1 + n_perm)
    return ShiftResult("mmd", obs, float(p), alpha, n_full[0], n_full[1],
                       {"bandwidth": float(sigma), "n_perm": n_perm, "kernel": "rbf",
                        "n_used": [len(x), len(y)]})


def _pca_pooled(x: np.ndarray, y: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.decomposition import PCA

    pooled = np.vstack([x, y])
    k = int(min(n_components, pooled.shape[1], len(pooled) - 1))
    z = PCA(n_components=k, svd_solver="full").fit_transform(pooled)
    return z[: len(x)], z[len(x):]


def ks_test(x: np.ndarray, y: np.ndarray, alpha: float = 0.05, pca_components: int | None = None,
            seed: int = 0) -> ShiftResult:
    """Two-sample KS test per dimension, Bonferroni-corrected: p = min(1, d * min_i p_i).

    pca_components: reduce to that many principal components of the pooled data first (Rabanser's
    "UAE/PCA" variant); fewer tests means less correction. ``seed`` is unused (the test is deterministic).
    """
    del seed
    x, y = _check_pair(x, y)
    if pca_components:
        x, y = _pca_pooled(x, y, pca_components)
    res = [stats.ks_2samp(x[:, j], y[:, j]) for j in range(x.shape[1])]
    pvals = np.array([r.pvalue for r in res], dtype=np.float64)
    d = len(pvals)
    worst = int(np.argmin(pvals))
    return ShiftResult("ks_bonferroni", float(res[worst].statistic), float(min(1.0, d * pvals[worst])), alpha,
                       len(x), len(y), {"n_dims": d, "pca_components": pca_components, "worst_dim": worst,
                                        "n_dims_rejected": int((pvals < alpha / d).sum())})


def classifier_shift_test(x: np.ndarray, y: np.ndarray, alpha: float = 0.05, test_size: float = 0.5,
                          C: float = 1.0, seed: int = 0) -> ShiftResult:
    """Domain-classifier test: can a held-out logistic regression tell source from target?

    Fits on one stratified half, scores the other; the p-value is the one-sided Mann-Whitney U test of the
    held-out AUROC > 0.5 (exact under "no shift", since held-out scores are then independent of domain).
    A binomial test of the held-out accuracy against the majority rate is reported alongside.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _check_pair(x, y, min_n=4)
    z = np.vstack([x, y])
    d = np.r_[np.zeros(len(x), int), np.ones(len(y), int)]
    z_tr, z_te, d_tr, d_te = train_test_split(z, d, test_size=test_size, stratify=d, random_state=seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, class_weight="balanced"))
    clf.fit(z_tr, d_tr)
    s = clf.predict_proba(z_te)[:, 1]
    u = stats.mannwhitneyu(s[d_te == 1], s[d_te == 0], alternative="greater")
    auroc = float(u.statistic / ((d_te == 1).sum() * (d_te == 0).sum()))
    correct = int(((s >= 0.5).astype(int) == d_te).sum())
    majority = float(max(d_te.mean(), 1 - d_te.mean()))
    p_acc = float(stats.binomtest(correct, len(d_te), majority, alternative="greater").pvalue)
    return ShiftResult("domain_classifier", auroc, float(u.pvalue), alpha, len(x), len(y),
                       {"auroc": auroc, "accuracy": correct / len(d_te), "accuracy_p_value": p_acc,
                        "n_test": int(len(d_te))})


def _as_probs(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.c_[1 - p, p] if p.ndim == 1 else p


def softmax_shift_test(p_source: np.ndarray, p_target: np.ndarray, alpha: float = 0.05,
                       seed: int = 0) -> ShiftResult:
    """BBSDs: KS test on each softmax output (binary: on P(positive) only), Bonferroni-corrected."""
    ps, pt = _as_probs(p_source), _as_probs(p_target)
    if ps.shape[1] == 2:
        ps, pt = ps[:, 1:], pt[:, 1:]
    r = ks_test(ps, pt, alpha=alpha, seed=seed)
    r.test = "softmax_ks"
    return r


def predicted_class_shift_test(p_source: np.ndarray, p_target: np.ndarray, alpha: float = 0.05,
                               seed: int = 0) -> ShiftResult:
    """BBSDh: chi-square test of the predicted-class distribution (argmax of the outputs)."""
    del seed
    ps, pt = _as_probs(p_source), _as_probs(p_target)
    k = ps.shape[1]
    table = np.stack([np.bincount(ps.argmax(1), minlength=k), np.bincount(pt.argmax(1), minlength=k)])
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:  # both sets predict one and the same class: nothing to compare
        stat, p = 0.0, 1.0
    else:
        stat, p, _, _ = stats.chi2_contingency(table)
    return ShiftResult("predicted_class_chi2", float(stat), float(p), alpha, len(ps), len(pt),
                       {"source_counts": table[0].tolist(), "target_counts": table[1].tolist()})


def detection_sample_size(x: np.ndarray, y: np.ndarray, test: ShiftTest = mmd_test, alpha: float = 0.05,
                          grid: Sequence[int] = (10, 20, 50, 100, 200, 500, 1000), n_rep: int = 20,
                          power: float = 0.8, seed: int = 0, **test_kwargs) -> dict:
    """Smallest n (cases per side, from ``grid``) at which ``test`` rejects at ``alpha`` in >= ``power`` of
    ``n_rep`` random subsamples. Stops at the first such n; n_needed is None if no n up to the data size
    suffices. Returns {"n_needed", "power": {n: fraction rejected}, "n_rep", "alpha"}.
    """
    x, y = _as_2d(x), _as_2d(y)
    rng = np.random.default_rng(seed)
    cap = min(len(x), len(y))
    sizes = sorted({int(n) for n in grid if n <= cap} | ({cap} if cap < max(grid) else set()))
    out: dict = {"n_needed": None, "power": {}, "n_rep": n_rep, "alpha": alpha, "test": test.__name__}
    for n in sizes:
        hits = 0
        for r in range(n_rep):
            xi = x[rng.choice(len(x), n, replace=False)]
            yi = y[rng.choice(len(y), n, replace=False)]
            hits += test(xi, yi, alpha=alpha, seed=seed + r, **test_kwargs).detected
        out["power"][n] = hits / n_rep
        if hits / n_rep >= power:
            out["n_needed"] = n
            break
    return out


def shift_suite(x_source: np.ndarray, x_target: np.ndarray, p_source: np.ndarray | None = None,
                p_target: np.ndarray | None = None, alpha: float = 0.05, n_perm: int = 200,
                pca_components: int | None = 32, sample_size: bool = True, seed: int = 0) -> dict:
    """All shift tests between two sets: embeddings (MMD, KS, domain classifier) and, when given, model
    outputs (softmax KS, predicted-class chi-square); plus the MMD detection sample size."""
    x_source, x_target = _as_2d(x_source), _as_2d(x_target)
    res = {
        "mmd": mmd_test(x_source, x_target, alpha, n_perm=n_perm, seed=seed),
        "ks": ks_test(x_source, x_target, alpha, pca_components=pca_components),
        "domain_classifier": classifier_shift_test(x_source, x_target, alpha, seed=seed),
    }
    if p_source is not None and p_target is not None:
        res["softmax_ks"] = softmax_shift_test(p_source, p_target, alpha)
        res["predicted_class"] = predicted_class_shift_test(p_source, p_target, alpha)
    out: dict = {k: v.to_dict() for k, v in res.items()}
    # several tests on one pair: the overall flag is Bonferroni-corrected so it keeps its false-positive rate
    out["any_detected"] = any(v.p_value < alpha / len(res) for v in res.values())
    if sample_size:
        out["mmd"]["sample_size"] = detection_sample_size(
            x_source, x_target, mmd_test, alpha, n_rep=10, seed=seed, n_perm=min(n_perm, 100))
    out["alpha"] = alpha
    return out


def fpr_bound(n_trials: int, alpha: float = 0.05, confidence: float = 0.95) -> int:
    """Most rejections an exactly calibrated test shows in ``n_trials`` null trials at ``confidence``."""
    return int(stats.binom.ppf(confidence, n_trials, alpha)) if n_trials else 0


__all__ = ["ShiftResult", "mmd_test", "ks_test", "classifier_shift_test", "softmax_shift_test",
           "predicted_class_shift_test", "detection_sample_size", "shift_suite", "median_bandwidth",
           "fpr_bound"]
