"""Few-shot prototypes: class means of L2-normalised features, cosine similarity, tempered softmax."""

from __future__ import annotations

import numpy as np

from medfm.tasks.adapt.registry import ADAPTERS, feature_method, seed_independent


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prototype_predict(x_tr: np.ndarray, y_tr: np.ndarray, x: np.ndarray, task: str, n_out: int,
                      temperature: float = 0.1) -> np.ndarray:
    """Probabilities from cosine similarity to class prototypes (classes missing from y_tr get 0)."""
    a, b = _l2(x_tr), _l2(x)
    if task == "multilabel":
        out = np.zeros((len(x), y_tr.shape[1]))
        for j in range(y_tr.shape[1]):
            pos, neg = y_tr[:, j] > 0, y_tr[:, j] <= 0
            if pos.any() and neg.any():
                s_pos = b @ _l2(a[pos].mean(0, keepdims=True)).T
                s_neg = b @ _l2(a[neg].mean(0, keepdims=True)).T
                # clipped: a tiny temperature would overflow exp (the sigmoid is saturated there anyway)
                out[:, j] = 1 / (1 + np.exp(np.clip(-(s_pos - s_neg)[:, 0] / temperature, -60, 60)))
            else:
                out[:, j] = float(pos.any())
        return out
    sims = np.full((len(x), n_out), -np.inf)
    for c in np.unique(y_tr).astype(int):
        sims[:, c] = (b @ _l2(a[y_tr == c].mean(0, keepdims=True)).T)[:, 0]
    z = sims / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    return p[:, 1] if task == "binary" else p


TEMPERATURES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def _log_loss(y: np.ndarray, p: np.ndarray, task: str) -> float:
    eps = 1e-7
    p = np.clip(p, eps, 1 - eps)
    if task == "multiclass":
        return float(-np.mean(np.log(p[np.arange(len(y)), y.astype(int)])))
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@ADAPTERS.register("prototype", help="nearest class prototype (mean of L2-normalised features), cosine")
@feature_method
@seed_independent
def prototype(ctx, train_idx: np.ndarray, seed: int) -> dict:
    """The softmax temperature only changes calibration (not the ranking), so it is picked on val by log-loss;
    ``cfg.proto_temperature`` > 0 fixes it instead."""
    f, y = ctx.features, ctx.labels["train"][train_idx]
    temps = [ctx.cfg.proto_temperature] if ctx.cfg.proto_temperature > 0 else TEMPERATURES
    t = min(temps, key=lambda t: _log_loss(ctx.labels["val"], prototype_predict(
        f["train"][train_idx], y, f["val"], ctx.task, ctx.n_out, t), ctx.task))
    return {"val": prototype_predict(f["train"][train_idx], y, f["val"], ctx.task, ctx.n_out, t),
            "test": prototype_predict(f["train"][train_idx], y, f["test"], ctx.task, ctx.n_out, t),
            "info": {"temperature": t}}
