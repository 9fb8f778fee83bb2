"""Full fine-tuning: encoder + linear head trained end to end, with validation-based model selection.

The training loop here is shared by LoRA and the from-scratch baseline, so all three get the same budget
(epochs over the labelled images, at least ``min_steps`` batches), the same augmentation and the same
model selection (best validation AUROC, early stopping) on the same labelled images.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfm.tasks.adapt.features import to_model_input
from medfm.tasks.adapt.registry import ADAPTERS
from medfm.train.augment import FINETUNE_PRESETS, BatchAugmentConfig, augment_batch
from medfm.train.precision import maybe_compile, optimizer_step, resolve_precision, scaled_backward, uncompile


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


def loss_fn(logits: torch.Tensor, y: torch.Tensor, task: str, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy (softmax or sigmoid); ``smoothing`` pulls targets towards uniform (tiny label sets)."""
    if task == "binary":
        t = y.float() * (1 - smoothing) + 0.5 * smoothing
        return F.binary_cross_entropy_with_logits(logits[:, 0], t)
    if task == "multilabel":
        t = y.float() * (1 - smoothing) + 0.5 * smoothing
        return F.binary_cross_entropy_with_logits(logits, t)
    return F.cross_entropy(logits, y.long(), label_smoothing=smoothing)


def logits_to_prob(logits: torch.Tensor, task: str) -> np.ndarray:
    if task == "binary":
        return torch.sigmoid(logits[:, 0]).numpy()
    if task == "multilabel":
        return torch.sigmoid(logits).numpy()
    return torch.softmax(logits, dim=1).numpy()


# the presets live in the one augmentation module (train/augment.py), shared with CLIP training
AUGMENT_PRESETS = FINETUNE_PRESETS
_FLIP_OK = {"us", "ultrasound", "derm", "dermatology", "pathology", "histology"}


def augment_for(name: str, modality: str | None) -> BatchAugmentConfig | None:
    """Resolve ``"auto"`` by modality (flips for ultrasound/dermatology/pathology, not for X-ray/CT/MR)."""
    if name == "auto":
        return AUGMENT_PRESETS["flip" if str(modality or "").lower() in _FLIP_OK else "light"]
    return AUGMENT_PRESETS[name]


def augment(x: torch.Tensor, gen: torch.Generator,
            cfg: BatchAugmentConfig | None = FINETUNE_PRESETS["light"]) -> torch.Tensor:
    """Apply ``cfg`` to a (B, C, H, W) batch with one random affine per image (2D only; 3D passes through)."""
    return augment_batch(x, gen, cfg) if x.ndim == 4 else x


def layer_decay_groups(model: nn.Module, base_lr: float, decay: float, head_lr: float,
                       weight_decay: float) -> list[dict]:
    """Parameter groups with layer-wise lr decay.

    Layers are the encoder's transformer ``blocks`` (ViT, hybrid) or, for CNNs, its ``stages`` (ResNet,
    ConvNeXt). Layer i of d gets ``base_lr * decay**(d - i)``, the stem / patch and position embedding
    ``decay**(d + 1)``, the final norm ``base_lr``; the head gets ``head_lr``. Biases and norms get no
    weight decay. Encoders with neither fall back to one group at ``base_lr``. Low layers hold generic
    features that pretraining got right, so they move least.
    """
    enc = getattr(model, "encoder", None)
    kind, depth = "", 0
    for attr in ("blocks", "stages"):
        layers = getattr(enc, attr, None)
        if isinstance(layers, nn.ModuleList | nn.Sequential):
            kind, depth = attr, len(layers)
            break
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("head"):
            lr = head_lr
        elif depth:
            m = re.search(rf"\b{kind}\.(\d+)\.", name)
            is_stem = re.search(r"patch|pos_|cls|embed|stem", name) is not None
            layer = int(m.group(1)) + 1 if m else (0 if is_stem else depth + 1)
            lr = base_lr * decay ** (depth + 1 - layer)
        else:
            lr = base_lr
        wd = 0.0 if p.ndim <= 1 else weight_decay
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def schedule_steps(n_labelled: int, cfg) -> int:
    """Optimisation steps for a run: ``cfg.steps`` when set, else epochs over the labelled set, clamped."""
    if cfg.steps > 0:
        return int(cfg.steps)
    per_epoch = math.ceil(max(1, n_labelled) / cfg.batch_size)
    return int(min(cfg.max_steps, max(cfg.min_steps, math.ceil(cfg.epochs * per_epoch))))


def val_score(y: np.ndarray, p: np.ndarray, task: str) -> float:
    """Model-selection score: validation AUROC, or minus the Brier score when AUROC is undefined."""
    from medfm.eval.metrics import classification_metrics

    try:
        auc = float(classification_metrics(y, p, task)["auroc"])
    except Exception:  # a degenerate val split: fall back to the loss
        auc = math.nan
    if math.isfinite(auc):
        return auc
    target = np.eye(p.shape[1])[np.asarray(y, int)] if task == "multiclass" else np.asarray(y, float)
    return -float(np.mean((p - target) ** 2))


def train_classifier(model: nn.Module, param_groups: Iterable[dict], images: np.ndarray, labels: np.ndarray,
                     task: str, steps: int, batch_size: int, seed: int, weight_decay: float = 0.05,
                     ref_encoder: nn.Module | None = None, use_augment: bool = True,
                     on_step: Callable[[int, float], None] | None = None,
                     aug: BatchAugmentConfig | None = FINETUNE_PRESETS["light"], smoothing: float = 0.0,
                     val: tuple[np.ndarray, np.ndarray] | None = None, eval_every: int = 0,
                     patience: int = 0, min_steps: int = 0, precision: str = "32",
                     compile: bool = False) -> dict:
    """AdamW, linear warm-up (10 %) then cosine decay over ``steps`` batches (epoch-wise shuffling).

    With ``val`` = (images, labels) the model is scored on val every ``eval_every`` steps, the best state
    (val AUROC) is restored at the end, and training stops after ``patience`` evaluations without
    improvement (never before ``min_steps``). ``ref_encoder`` gives the input convention (channels,
    size); it defaults to ``model.encoder``. ``precision`` ("32" | "bf16-mixed" | "16-mixed") autocasts
    the forward pass and loss; ``compile`` runs the model through torch.compile (eager, with one warning,
    if that fails). Returns losses, best step and best val score.
    """
    ref = ref_encoder if ref_encoder is not None else model.encoder
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(list(param_groups), weight_decay=weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    warm = max(1, steps // 10)
    device = next(model.parameters()).device
    prec = resolve_precision(precision, device)
    scaler = prec.grad_scaler()
    maybe_compile(model, compile)
    bs = min(batch_size, max(len(images), 1))
    x_all = to_model_input(images, ref)  # convert once: resizing per batch is wasted work
    y_all = torch.as_tensor(np.asarray(labels))
    order: list[int] = []
    losses: list[float] = []
    best = {"score": -math.inf, "step": -1, "state": None}
    since_best = 0
    # once per epoch, but not more often than every 5 steps (tiny label sets have 1-step epochs)
    eval_every = eval_every or max(5, math.ceil(len(images) / bs))
    try:
        model.train()
        for step in range(steps):
            decay = 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
            f = (step + 1) / warm if step < warm else decay
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * f
            if len(order) < bs:  # reshuffle each epoch: every image is seen once per epoch
                order += rng.permutation(len(images)).tolist()
            idx, order = order[:bs], order[bs:]
            x = x_all[idx]
            if use_augment:
                x = augment(x, gen, aug)
            with prec.autocast():
                logits = model(x.to(device))
            loss = loss_fn(logits.float(), y_all[idx].to(device), task, smoothing)
            opt.zero_grad(set_to_none=True)
            scaled_backward(loss, scaler)
            optimizer_step(opt, scaler)
            losses.append(float(loss.detach()))
            if on_step:
                on_step(step, losses[-1])
            if val is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
                p = predict(model, val[0], task, ref, precision=precision)
                score = val_score(val[1], p, task)
                model.train()
                if score > best["score"] + 1e-4:
                    best = {"score": score, "step": step + 1,
                            "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                    since_best = 0
                else:
                    since_best += 1
                    if patience and since_best >= patience and step + 1 >= min_steps:
                        break
    finally:  # even on Ctrl-C or an error, the caller gets back a plain (uncompiled) module
        uncompile(model)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return {"losses": losses, "best_step": best["step"], "best_val": best["score"], "steps_run": len(losses)}


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, task: str, ref_encoder: nn.Module,
            batch_size: int = 128, precision: str = "32") -> np.ndarray:
    """Probabilities of ``images`` (logits computed under ``precision``'s autocast, then float32)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prec = resolve_precision(precision, device)
    outs = []
    for i in range(0, len(images), batch_size):
        with prec.autocast():
            x = to_model_input(images[i:i + batch_size], ref_encoder).to(device)
            outs.append(model(x).float().cpu())
    model.train(was_training)
    return logits_to_prob(torch.cat(outs), task)


def fit_and_predict(ctx, model: Classifier, param_groups: list[dict], train_idx: np.ndarray, seed: int,
                    ref_encoder: nn.Module | None = None) -> dict:
    """Train with the shared recipe (ctx.cfg), select on val, and predict val and test; the trained
    ``encoder`` and ``head`` come back too (what a saved classifier holds)."""
    ref = ref_encoder if ref_encoder is not None else model.encoder
    cfg = ctx.cfg
    torch.manual_seed(seed)
    steps = schedule_steps(len(train_idx), cfg)
    aug = augment_for(cfg.augment, getattr(ctx, "modality", None))
    select = cfg.select_on_val and len(ctx.labels["val"]) > 0
    prec = getattr(cfg, "precision", "32")
    out = train_classifier(model, param_groups, ctx.images["train"][train_idx],
                           ctx.labels["train"][train_idx], ctx.task, steps, cfg.batch_size, seed,
                           weight_decay=cfg.weight_decay,
                           ref_encoder=ref, use_augment=aug is not None, aug=aug, on_step=ctx.on_step,
                           smoothing=cfg.label_smoothing,
                           val=(ctx.images["val"], ctx.labels["val"]) if select else None,
                           eval_every=cfg.eval_every, patience=cfg.patience,
                           min_steps=min(steps, cfg.min_steps),
                           precision=prec, compile=getattr(cfg, "compile", False))
    losses = out["losses"]
    return {"val": predict(model, ctx.images["val"], ctx.task, ref, precision=prec),
            "test": predict(model, ctx.images["test"], ctx.task, ref, precision=prec),
            "info": {"final_loss": float(np.mean(losses[-5:])) if losses else math.nan,
                     "steps_planned": steps, "steps_run": out["steps_run"], "best_step": out["best_step"],
                     "best_val": out["best_val"], "augment": cfg.augment if aug is not None else "none"},
            "encoder": getattr(model, "encoder", None), "head": getattr(model, "head", None)}


@ADAPTERS.register("finetune", help="full fine-tune: encoder (layer-wise lr decay) + head, AdamW, "
                   "augmentation, best-val checkpoint")
def finetune(ctx, train_idx: np.ndarray, seed: int, head: nn.Linear | None = None) -> dict:
    """``head``: start from this head (LP-FT) instead of a fresh one."""
    torch.manual_seed(seed)
    model = Classifier(copy.deepcopy(ctx.encoder), head_outputs(ctx.task, ctx.n_out))
    if head is not None:
        model.head = head
    cfg = ctx.cfg
    groups = layer_decay_groups(model, cfg.lr_finetune, cfg.layer_decay, cfg.lr_head, cfg.weight_decay)
    return fit_and_predict(ctx, model, groups, train_idx, seed)
