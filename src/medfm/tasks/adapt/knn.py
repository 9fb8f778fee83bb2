"""k-nearest-neighbour classifier on frozen features: cosine distance, distance-weighted votes."""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from medfm.tasks.adapt.registry import ADAPTERS, feature_method, no_model, seed_independent


def knn_predict(x_tr: np.ndarray, y_tr: np.ndarray, x: np.ndarray, task: str, n_out: int,
                k: int = 20) -> np.ndarray:
    """Class probabilities of ``x`` from its k nearest training features (cosine, weights 1/distance)."""
    k = max(1, min(k, len(x_tr)))
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance", algorithm="brute")
    clf.fit(x_tr, y_tr)
    raw = clf.predict_proba(x)
    if task == "multilabel":
        # one (n, n_classes_j) array per label; a label seen with one value only has a single column
        # (sklearn flattens a single label column, so wrap it back into one-label form)
        raw, all_classes = (raw, clf.classes_) if isinstance(raw, list) else ([raw], [clf.classes_])
        cols = []
        for pj, classes in zip(raw, all_classes, strict=True):
            cols.append(pj[:, list(classes).index(1)] if 1 in classes else np.zeros(len(x)))
        return np.stack(cols, axis=1)
    full = np.zeros((len(x), n_out))
    full[:, clf.classes_.astype(int)] = raw
    return full[:, 1] if task == "binary" else full


@ADAPTERS.register("knn", help="k-nearest neighbours on frozen features (cosine, distance-weighted)")
@feature_method
@seed_independent
@no_model
def knn(ctx, train_idx: np.ndarray, seed: int) -> dict:
    f, y = ctx.features, ctx.labels["train"][train_idx]
    k = ctx.cfg.knn_k
    return {"val": knn_predict(f["train"][train_idx], y, f["val"], ctx.task, ctx.n_out, k),
            "test": knn_predict(f["train"][train_idx], y, f["test"], ctx.task, ctx.n_out, k),
            "info": {"k": min(k, len(train_idx))}}
