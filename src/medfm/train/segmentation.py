"""LightningModule for supervised segmentation: Dice + cross-entropy, optional frozen / slower encoder."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from monai.losses import DiceCELoss
from torch import nn


def seg_loss() -> nn.Module:
    """Dice + CE on softmax logits (B, K, *S) against integer labels (B, 1, *S)."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


class SegmentationModule(L.LightningModule):
    """Trains ``model`` (logits (B, K, *S)) on batches {"image": (B, C, *S), "mask": (B, *S) int64}.

    encoder_lr_scale < 1 fine-tunes the pretrained encoder more gently than the fresh decoder; freeze_encoder
    keeps it fixed (linear-probe style, and much faster on CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        encoder_lr_scale: float = 0.1,
        freeze_encoder: bool = False,
        weight_decay: float = 1e-4,
        max_steps: int = 1000,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.encoder_lr_scale, self.weight_decay = lr, encoder_lr_scale, weight_decay
        self.freeze_encoder, self.max_steps = freeze_encoder, max_steps
        self.loss_fn = seg_loss()
        enc = getattr(model, "encoder", None)
        if freeze_encoder and enc is not None:
            for p in enc.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        enc = getattr(self.model, "encoder", None)
        if self.freeze_encoder and enc is not None:
            enc.eval()  # frozen: keep norm statistics / dropout as pretrained

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["image"])
        loss = self.loss_fn(logits, batch["mask"].unsqueeze(1))
        self.log("train_loss", loss, prog_bar=True, on_step=True, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self):
        enc = getattr(self.model, "encoder", None)
        enc_ids = {id(p) for p in enc.parameters()} if enc is not None else set()
        enc_params = [p for p in self.model.parameters() if id(p) in enc_ids and p.requires_grad]
        rest = [p for p in self.model.parameters() if id(p) not in enc_ids and p.requires_grad]
        groups = [{"params": rest, "lr": self.lr}]
        if enc_params:
            groups.append({"params": enc_params, "lr": self.lr * self.encoder_lr_scale})
        opt = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
        warm = max(1, min(50, self.max_steps // 10))
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, 0.1, 1.0, warm),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, self.max_steps - warm)),
            ],
            [warm],
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StepProgressBar(TQDMProgressBar):
    """Progress in optimisation steps ("train 12/500").

    Segmentation trains for ``max_steps`` over one long epoch; Lightning's default bar would print
    "Epoch 0/-2" (it derives the epoch count from max_epochs=-1)."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: object) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.set_description("train step")


def make_trainer(max_steps: int, progress: bool = True, callbacks: list | None = None,
                 precision: str = "32", **kw) -> L.Trainer:
    """A quiet Lightning trainer: no logger/checkpoint files (the run directory is written by the task).

    ``precision`` is checked first (medfm.train.precision): a combination the device cannot run is a
    one-line ConfigError."""
    from medfm.train.precision import resolve_precision

    resolve_precision(precision, "auto")
    cbs = list(callbacks or []) + ([StepProgressBar()] if progress else [])
    return L.Trainer(
        max_steps=max_steps,
        callbacks=cbs or None,
        precision=precision,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        **kw,
    )
