"""LP-FT: fine-tune starting from a linear-probe head (Kumar et al., 2022, "Fine-Tuning can Distort
Pretrained Features").

A randomly initialised head sends large, noisy gradients into the pretrained encoder in the first steps
and distorts the features fine-tuning should build on. Fitting the head first on frozen features (the
linear probe, C chosen on val) and then fine-tuning everything keeps the early gradients small and
informative; it usually helps most when the labelled set is small or the shift from pretraining is large.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from medfm.tasks.adapt.finetune import finetune, head_outputs
from medfm.tasks.adapt.linear import fit_best_logistic, linear_head, logistic_rows
from medfm.tasks.adapt.registry import ADAPTERS


def probe_head(ctx, train_idx: np.ndarray, seed: int, n_logits: int) -> nn.Linear | None:
    """A head on raw embeddings equal to the val-selected linear probe (standardisation folded in)."""
    f = ctx.features
    fitted = fit_best_logistic(f["train"][train_idx], ctx.labels["train"][train_idx], f["val"],
                               ctx.labels["val"], ctx.task, ctx.n_out, tuple(ctx.cfg.c_grid), seed)
    if fitted is None:
        return None
    clf, scaler, _ = fitted
    w, b = logistic_rows(clf, ctx.task, ctx.n_out)
    return linear_head(w, b, scaler) if w.shape[0] == n_logits else None


@ADAPTERS.register("lpft", help="linear probe, then full fine-tune from that head (LP-FT): the same recipe "
                   "as finetune, with less distortion of the pretrained features")
def lpft(ctx, train_idx: np.ndarray, seed: int) -> dict:
    head = probe_head(ctx, train_idx, seed, head_outputs(ctx.task, ctx.n_out))
    out = finetune(ctx, train_idx, seed, head=head)
    out["info"]["probe_head"] = head is not None
    return out
