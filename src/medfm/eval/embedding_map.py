"""2-D maps of embeddings (PCA, or t-SNE for larger sets) for visual inspection by label and by site."""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE


def embed_2d(features: np.ndarray, method: str = "auto", seed: int = 0, max_points: int = 3000) -> np.ndarray:
    """(n, d) -> (n, 2). "auto" uses t-SNE for 50..max_points points, PCA otherwise; points beyond
    ``max_points`` are not mapped by t-SNE (PCA is used instead) to bound time."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 3:
        return np.zeros((len(x), 2))
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    if method == "auto":
        method = "tsne" if 50 <= len(x) <= max_points else "pca"
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        # PCA to <= 50 dims first: the usual speed-up, and it removes noise dimensions
        if x.shape[1] > 50:
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        perplexity = float(min(30, max(5, (len(x) - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    raise ValueError(f"unknown embedding map method {method!r} (pca, tsne, auto)")
