"""Few-shot prototypes: class means of L2-normalised features, cosine similarity, tempered softmax."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfm.tasks.adapt.linear import CERTAIN
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


class PrototypeHead(nn.Module):
    """:func:`prototype_predict` as a head on raw embeddings: cosine similarity to stored prototypes over the
    temperature, as logits in the head convention (one for binary, one per class or label otherwise).

    Prototypes are buffers (``protos``: one row per class, or per label its positive then negative rows);
    ``valid`` marks the ones the labelled subset showed, ``const`` is the fixed answer of a label seen with
    one value only.
    """

    def __init__(self, task: str, n_out: int, dim: int, temperature: float) -> None:
        super().__init__()
        self.task, self.n_out, self.temperature = task, int(n_out), float(temperature)
        self.spec = {"type": "prototype", "task": task, "n_out": int(n_out), "dim": int(dim),
                     "temperature": float(temperature)}
        n_rows = 2 * n_out if task == "multilabel" else n_out
        self.register_buffer("protos", torch.zeros(n_rows, dim))
        self.register_buffer("valid", torch.zeros(n_out, dtype=torch.bool))
        self.register_buffer("const", torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.normalize(x.float(), dim=1, eps=1e-12) @ self.protos.T
        certain = torch.full_like(s[:, :self.n_out], CERTAIN)
        if self.task == "multilabel":
            k = self.n_out
            z = ((s[:, :k] - s[:, k:]) / self.temperature).clamp(-60, 60)
            return torch.where(self.valid, z, torch.where(self.const > 0.5, certain, -certain))
        z = torch.where(self.valid, s / self.temperature, -certain)  # an unseen class: probability 0
        return z[:, 1:2] - z[:, 0:1] if self.task == "binary" else z


def prototype_head(x_tr: np.ndarray, y_tr: np.ndarray, task: str, n_out: int,
                   temperature: float) -> PrototypeHead:
    """The head equal to ``prototype_predict(x_tr, y_tr, ., task, n_out, temperature)``."""
    a = _l2(np.asarray(x_tr, np.float64))
    n_lab = y_tr.shape[1] if task == "multilabel" else n_out
    head = PrototypeHead(task, n_lab, a.shape[1], temperature)
    protos = np.zeros(tuple(head.protos.shape))
    valid, const = np.zeros(n_lab, bool), np.zeros(n_lab)
    for j in range(n_lab):
        if task == "multilabel":
            pos, neg = y_tr[:, j] > 0, y_tr[:, j] <= 0
            valid[j], const[j] = pos.any() and neg.any(), float(pos.any())
            if valid[j]:
                protos[j], protos[n_lab + j] = _l2(a[pos].mean(0, keepdims=True))[0], \
                    _l2(a[neg].mean(0, keepdims=True))[0]
        elif (y_tr == j).any():
            valid[j] = True
            protos[j] = _l2(a[y_tr == j].mean(0, keepdims=True))[0]
    with torch.no_grad():
        head.protos.copy_(torch.as_tensor(protos, dtype=torch.float32))
        head.valid.copy_(torch.as_tensor(valid))
        head.const.copy_(torch.as_tensor(const, dtype=torch.float32))
    return head


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
            "info": {"temperature": t},
            "head": prototype_head(f["train"][train_idx], y, ctx.task, ctx.n_out, t)}
