"""LP-FT: fine-tune starting from a linear-probe head (Kumar et al., 2022, "Fine-Tuning can Distort
Pretrained Features").

A randomly initialised head sends large, noisy gradients into the pretrained encoder in the first steps
and distorts the features fine-tuning should build on. Fitting the head first on frozen features (the
linear probe, C chosen on val) and then fine-tuning everything keeps the early gradients small and
informative; it usually helps most when the labelled set is small or the shift from pretraining is large.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medfm.tasks.adapt.finetune import finetune, head_outputs
from medfm.tasks.adapt.linear import fit_best_logistic
from medfm.tasks.adapt.registry import ADAPTERS

ABSENT_BIAS = -5.0  # logit offset for a class the labelled subset never shows (predicted rarely)


def _rows(clf, task: str, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights (n_logits, D) and biases in standardised-feature space, in the head's logit convention."""
    if task == "multilabel":
        ws, bs = [], []
        for est in clf.estimators_:
            if hasattr(est, "coef_"):
                ws.append(est.coef_[0])
                bs.append(float(est.intercept_[0]))
            else:  # a label column that is constant in the subset: a fixed prediction
                const = float(np.ravel(getattr(est, "y_", [0]))[0])
                ws.append(np.zeros(clf.n_features_in_))
                bs.append(-ABSENT_BIAS if const > 0.5 else ABSENT_BIAS)
        return np.stack(ws), np.asarray(bs)
    if task == "binary":
        return clf.coef_[:1], clf.intercept_[:1]
    cls = clf.classes_.astype(int)
    coef, icpt = clf.coef_, clf.intercept_
    if len(cls) == 2:  # sklearn's binary form (one row for the second class): softmax over (0, row)
        coef = np.concatenate([np.zeros_like(coef), coef])
        icpt = np.concatenate([np.zeros_like(icpt), icpt])
    w = np.zeros((n_out, coef.shape[1]))
    b = np.full(n_out, float(icpt.min()) + ABSENT_BIAS)
    w[cls] = coef
    b[cls] = icpt
    return w, b


def probe_head(ctx, train_idx: np.ndarray, seed: int, n_logits: int) -> nn.Linear | None:
    """A head on raw embeddings equal to the val-selected linear probe (standardisation folded in)."""
    f = ctx.features
    fitted = fit_best_logistic(f["train"][train_idx], ctx.labels["train"][train_idx], f["val"],
                               ctx.labels["val"], ctx.task, ctx.n_out, tuple(ctx.cfg.c_grid), seed)
    if fitted is None:
        return None
    clf, scaler, _ = fitted
    w, b = _rows(clf, ctx.task, ctx.n_out)
    if w.shape[0] != n_logits:
        return None
    scale = np.asarray(scaler.scale_, dtype=np.float64)
    mean = np.asarray(scaler.mean_, dtype=np.float64)
    head = nn.Linear(w.shape[1], n_logits)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w / scale, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(b - (w * mean / scale).sum(1), dtype=torch.float32))
    return head


@ADAPTERS.register("lpft", help="linear probe, then full fine-tune from that head (LP-FT): the same recipe "
                   "as finetune, with less distortion of the pretrained features")
def lpft(ctx, train_idx: np.ndarray, seed: int) -> dict:
    head = probe_head(ctx, train_idx, seed, head_outputs(ctx.task, ctx.n_out))
    out = finetune(ctx, train_idx, seed, head=head)
    out["info"]["probe_head"] = head is not None
    return out
