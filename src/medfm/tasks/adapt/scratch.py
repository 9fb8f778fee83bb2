"""Supervised from-scratch baseline: the same architecture, randomly initialised, same labels and budget.

It is the reference every label-efficiency curve needs: pretraining is only worth it if it beats this.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from medfm.tasks.adapt.finetune import Classifier, fit_and_predict, head_outputs, layer_decay_groups
from medfm.tasks.adapt.registry import ADAPTERS


def fresh_like(encoder: nn.Module, seed: int) -> nn.Module:
    """A randomly initialised copy of ``encoder``'s architecture.

    Rebuilt from ``encoder.config`` through the encoder registry when possible (so the model's own init is
    used); otherwise a deep copy whose layers are reset with their ``reset_parameters``.
    """
    torch.manual_seed(seed)
    cfg = dict(getattr(encoder, "config", {}) or {})
    if cfg.get("name"):
        try:
            from medfm.models.registry import create_encoder

            return create_encoder(**cfg)
        except Exception:  # registry missing or config not rebuildable: fall back to resetting a copy
            pass
    fresh = copy.deepcopy(encoder)
    for m in fresh.modules():
        if m is not fresh and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


@ADAPTERS.register("scratch", help="same architecture from random init; same labels, budget, augmentation "
                   "and best-val model selection")
def scratch(ctx, train_idx: np.ndarray, seed: int) -> dict:
    enc = fresh_like(ctx.encoder, seed)
    model = Classifier(enc, head_outputs(ctx.task, ctx.n_out))
    # no layer-wise decay: every layer must learn from nothing
    groups = layer_decay_groups(model, ctx.cfg.lr_scratch, 1.0, max(ctx.cfg.lr_scratch, ctx.cfg.lr_head),
                                ctx.cfg.weight_decay)
    return fit_and_predict(ctx, model, groups, train_idx, seed)
