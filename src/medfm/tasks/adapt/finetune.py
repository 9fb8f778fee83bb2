"""Full fine-tuning: encoder + linear head trained end to end with AdamW and light augmentation.

The training loop here is shared by LoRA and the from-scratch baseline, so all three get the same
optimisation budget (``steps`` batches of ``batch_size``) on the same labelled images.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfm.tasks.adapt.features import to_model_input
from medfm.tasks.adapt.registry import ADAPTERS


class Classifier(nn.Module):
    """An encoder followed by a linear head on its pooled embedding."""

    def __init__(self, encoder: nn.Module, n_outputs: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.embed_dim), n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def head_outputs(task: str, n_out: int) -> int:
    """Logits needed: one for binary (sigmoid), C for multi-class (softmax), K for multi-label (sigmoid)."""
    return 1 if task == "binary" else n_out


def loss_fn(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "binary":
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y.long())


def logits_to_prob(logits: torch.Tensor, task: str) -> np.ndarray:
    if task == "binary":
        return torch.sigmoid(logits[:, 0]).numpy()
    if task == "multilabel":
        return torch.sigmoid(logits).numpy()
    return torch.softmax(logits, dim=1).numpy()


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine (±6 % shift, ±5 % scale) and brightness/contrast jitter (±10 %).

    No flips: left/right carries anatomy in chest X-rays (heart side).
    """
    b = x.shape[0]
    if x.ndim != 4:
        return x
    scale = 1 + (torch.rand(b, generator=gen) - 0.5) * 0.1
    shift = (torch.rand(b, 2, generator=gen) - 0.5) * 0.12
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.2
    bright = (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.2
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * contrast + mean + bright * x.std().clamp(min=1e-3)


def train_classifier(model: nn.Module, param_groups: Iterable[dict], images: np.ndarray, labels: np.ndarray,
                     task: str, steps: int, batch_size: int, seed: int, weight_decay: float = 0.05,
                     ref_encoder: nn.Module | None = None, use_augment: bool = True,
                     on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW with linear warm-up then cosine decay for ``steps`` batches drawn with replacement.

    ``ref_encoder`` gives the input convention (channels, size); it defaults to ``model.encoder``.
    Returns the loss per step.
    """
    ref = ref_encoder if ref_encoder is not None else model.encoder
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(list(param_groups), weight_decay=weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    warm = max(1, steps // 10)
    model.train()
    device = next(model.parameters()).device
    losses = []
    for step in range(steps):
        decay = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        f = (step + 1) / warm if step < warm else decay
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        idx = rng.integers(0, len(images), size=min(batch_size, max(len(images), 2)))
        x = to_model_input(images[np.sort(idx)], ref)
        if use_augment:
            x = augment(x, gen)
        y = torch.as_tensor(labels[np.sort(idx)])
        loss = loss_fn(model(x.to(device)), y.to(device), task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    return losses


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, task: str, ref_encoder: nn.Module,
            batch_size: int = 64) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    outs = [model(to_model_input(images[i:i + batch_size], ref_encoder).to(device)).float().cpu()
            for i in range(0, len(images), batch_size)]
    return logits_to_prob(torch.cat(outs), task)


def fit_and_predict(ctx, model: Classifier, param_groups: list[dict], train_idx: np.ndarray, seed: int,
                    ref_encoder: nn.Module | None = None) -> dict:
    ref = ref_encoder if ref_encoder is not None else model.encoder
    torch.manual_seed(seed)
    losses = train_classifier(model, param_groups, ctx.images["train"][train_idx],
                              ctx.labels["train"][train_idx], ctx.task, ctx.cfg.steps,
                              ctx.cfg.batch_size, seed, ref_encoder=ref, on_step=ctx.on_step)
    return {"val": predict(model, ctx.images["val"], ctx.task, ref),
            "test": predict(model, ctx.images["test"], ctx.task, ref),
            "info": {"final_loss": float(np.mean(losses[-5:])) if losses else math.nan}}


@ADAPTERS.register("finetune", help="full fine-tune: encoder + linear head, AdamW, light augmentation")
def finetune(ctx, train_idx: np.ndarray, seed: int) -> dict:
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(ctx.encoder), head_outputs(ctx.task, ctx.n_out))
    groups = [{"params": model.encoder.parameters(), "lr": ctx.cfg.lr_finetune},
              {"params": model.head.parameters(), "lr": ctx.cfg.lr_finetune * 10}]
    return fit_and_predict(ctx, model, groups, train_idx, seed)
