"""The step loop shared by promptable and in-context training: AdamW with a gentler encoder learning rate,
a cosine schedule, and one loss per step from a caller's closure (which draws that step's episodes)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def train_steps(
    model: torch.nn.Module,
    step_loss: Callable[[], torch.Tensor],
    steps: int,
    lr: float,
    encoder_lr_scale: float,
    desc: str,
    progress: bool = False,
    precision: str = "32",
) -> list[float]:
    """Train ``model`` (it must have an ``.encoder``) for ``steps`` steps of ``step_loss()``; returns the
    loss curve. The encoder runs at ``lr * encoder_lr_scale``; the model is left in eval mode.
    ``step_loss()`` runs under ``precision``'s autocast (32 | bf16-mixed | 16-mixed; medfm.train.precision).
    """
    from medfm.train.precision import optimizer_step, resolve_precision, scaled_backward

    prec = resolve_precision(precision, next(model.parameters()).device)
    scaler = prec.grad_scaler()
    enc_ids = {id(p) for p in model.encoder.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in enc_ids], "lr": lr},
        {"params": [p for p in model.parameters() if id(p) in enc_ids], "lr": lr * encoder_lr_scale},
    ]
    opt = torch.optim.AdamW([gr for gr in groups if gr["params"]], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    hist: list[float] = []
    model.train()
    it = range(steps)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=desc, leave=False)
    for _ in it:
        with prec.autocast():
            loss = step_loss().float()
        opt.zero_grad()
        scaled_backward(loss, scaler)
        optimizer_step(opt, scaler)
        sched.step()
        hist.append(float(loss.detach()))
    model.eval()
    return hist
