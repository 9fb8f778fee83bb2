"""Masked autoencoder (MAE) pretraining for ViT encoders, 2D and 3D.

Read top to bottom: pure functions (patchify, random_masking, mae_loss), the MAE module (encoder on the
visible 25% of patches only, a light decoder with mask tokens), then the registered training objective.

Speed on CPU comes from doing less work, not from tricks: the encoder sees only visible tokens, the decoder
is narrow and shallow (128 x 2 by default), attention uses ``scaled_dot_product_attention`` with fused qkv,
and the prediction head runs on masked tokens only (the loss ignores the others).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfm.errors import ConfigError
from medfm.models.layers import sincos_pos_embed
from medfm.models.vit import Block
from medfm.train.objectives import OBJECTIVES, Objective


def patchify(imgs: torch.Tensor, patch: int, spatial_dims: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C); (B, C, D, H, W) -> (B, N, p*p*p*C).

    Token order is row-major over the patch grid (as ``conv(x).flatten(2)``); within a patch, pixels are
    row-major with channels last.
    """
    b, c = imgs.shape[:2]
    sp = imgs.shape[2:]
    if len(sp) != spatial_dims:
        raise ValueError(f"expected {spatial_dims} spatial axes, got shape {tuple(imgs.shape)}")
    if any(s % patch for s in sp):
        raise ValueError(f"image size {tuple(sp)} is not divisible by patch {patch}")
    g = [s // patch for s in sp]
    if spatial_dims == 2:
        x = imgs.reshape(b, c, g[0], patch, g[1], patch).permute(0, 2, 4, 3, 5, 1)
    else:
        x = imgs.reshape(b, c, g[0], patch, g[1], patch, g[2], patch).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, math.prod(g), patch**spatial_dims * c)


def unpatchify(x: torch.Tensor, patch: int, grid: tuple[int, ...], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = x.shape[0]
    nd = len(grid)
    x = x.reshape(b, *grid, *([patch] * nd), channels)
    if nd == 2:
        x = x.permute(0, 5, 1, 3, 2, 4)
    else:
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, *(g * patch for g in grid))


def random_masking(
    n_batch: int,
    n_tokens: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise.

    Returns ``ids_keep`` (B, K) indices of visible tokens, ``mask`` (B, N) with 1 = masked / 0 = visible in
    the original token order, and ``ids_restore`` (B, N) that undoes the shuffle.
    """
    n_keep = max(1, int(round(n_tokens * (1 - ratio))))
    dev = device if device is not None else (generator.device if generator is not None else "cpu")
    noise = torch.rand(n_batch, n_tokens, generator=generator, device=dev)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(n_batch, n_tokens, device=dev)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Mean squared error over the MASKED patches only.

    pred, target: (B, N, P) patch pixels; mask: (B, N), 1 = masked. With ``norm_pix`` each target patch is
    normalised to zero mean / unit variance first (sharper representations, MAE paper).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class MAE(nn.Module):
    """Masked autoencoder around a ViT-family encoder with the token API (patch_tokens / forward_tokens)."""

    def __init__(
        self,
        encoder: nn.Module,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        mask_ratio: float = 0.75,
        norm_pix: bool = True,
    ) -> None:
        super().__init__()
        for attr in ("patch_tokens", "forward_tokens", "grid", "patch_size"):
            if not hasattr(encoder, attr):
                name = getattr(encoder, "config", {}).get("name", type(encoder).__name__)
                raise ConfigError(
                    f"MAE needs a ViT-style encoder with a token API; '{name}' has no {attr} "
                    "(use --objective contrastive for CNN encoders)"
                )
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix = norm_pix
        self.patch = int(encoder.patch_size)
        self.grid = tuple(encoder.grid)
        self.spatial_dims = len(self.grid)
        self.in_chans = int(encoder.in_chans)
        d = int(encoder.embed_dim)
        self.decoder_embed = nn.Linear(d, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # Fixed sin-cos positions (MAE): nothing to learn, and they extend to any grid.
        pos = torch.cat([torch.zeros(1, decoder_dim), sincos_pos_embed(self.grid, decoder_dim)])
        self.register_buffer("decoder_pos", pos.unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch**self.spatial_dims * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encode(
        self, imgs: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.encoder.patch_tokens(imgs)
        b, n, d = tokens.shape
        ids_keep, mask, ids_restore = random_masking(b, n, self.mask_ratio, generator, device=tokens.device)
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        return self.encoder.forward_tokens(visible), mask, ids_restore

    def decode(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, only: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict patch pixels; ``only`` (B, M) token indices restricts the (costly) head to those tokens."""
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        k = x.shape[1] - 1
        x_ = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(b, n - k, -1)], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = x[:, 1:]
        if only is not None:
            x = torch.gather(x, 1, only.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return self.decoder_pred(self.decoder_norm(x))

    def forward(
        self, imgs: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred (B, N, P) for all patches, mask (B, N)). For training use :meth:`loss`."""
        latent, mask, ids_restore = self.encode(imgs, generator)
        pred = self.decode(latent, ids_restore)
        target = patchify(imgs, self.patch, self.spatial_dims)
        return mae_loss(pred, target, mask, self.norm_pix), pred, mask

    def loss(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training loss; the prediction head and the target cover masked patches only (same value)."""
        latent, mask, ids_restore = self.encode(imgs, generator)
        n_keep = latent.shape[1] - 1
        ids_masked = torch.argsort(ids_restore, dim=1)[:, n_keep:]  # shuffle order: masked ones come last
        pred = self.decode(latent, ids_restore, only=ids_masked)
        target = patchify(imgs, self.patch, self.spatial_dims)
        target = torch.gather(target, 1, ids_masked.unsqueeze(-1).expand(-1, -1, target.shape[2]))
        return mae_loss(pred, target, torch.ones_like(ids_masked, dtype=pred.dtype), self.norm_pix)

    @torch.no_grad()
    def reconstruct(
        self, imgs: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction) images for display; visible patches are pasted from the input."""
        _, pred, mask = self.forward(imgs, generator)
        target = patchify(imgs, self.patch, self.spatial_dims)
        if self.norm_pix:  # undo the per-patch normalisation with the true patch statistics
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
            pred = pred * std + mean
        m = mask.unsqueeze(-1)
        recon = unpatchify(pred * m + target * (1 - m), self.patch, self.grid, self.in_chans)
        masked = unpatchify(target * (1 - m), self.patch, self.grid, self.in_chans)
        return masked, recon.clamp(0, 1)


def save_reconstructions(
    mae: MAE, imgs: torch.Tensor, path: Path, generator: torch.Generator | None = None
) -> Path:
    """A PNG grid: rows = images, columns = original / masked / reconstruction (3D: the middle slice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = mae.training
    mae.eval()
    masked, recon = mae.reconstruct(imgs, generator)
    mae.train(was_training)

    def show(t: torch.Tensor) -> Any:
        t = t.float().cpu()
        if t.ndim == 4:  # (C, D, H, W): middle slice
            t = t[:, t.shape[1] // 2]
        return t[0].numpy()

    n = imgs.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i in range(n):
        for j, (title, t) in enumerate(
            [("original", imgs[i]), ("masked", masked[i]), ("reconstruction", recon[i])]
        ):
            axes[i, j].imshow(show(t), cmap="gray", vmin=0, vmax=1)
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@OBJECTIVES.register("mae", help="Masked autoencoder: reconstruct 75% hidden patches (ViT encoders)")
class MAEObjective(Objective):
    """MAE pretraining objective (LightningModule)."""

    name = "mae"

    def __init__(self, encoder: nn.Module, cfg: Any) -> None:
        super().__init__(encoder, cfg)
        self.mae = MAE(
            encoder, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.mask_ratio, cfg.norm_pix
        )

    def make_dataset(self, base: torch.utils.data.Dataset) -> torch.utils.data.Dataset:
        from medfm.train.augment import MaskedModelingAugment
        from medfm.train.datamodule import SingleViewDataset

        return SingleViewDataset(base, MaskedModelingAugment(self.cfg.size), self.cfg.seed)

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.mae.loss(batch["image"], self.step_generator())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.cfg.recon_every
        if every and self.run_dir is not None and self.global_rank == 0 and self.global_step % every == 0:
            imgs = batch["image"][:4].detach()
            save_reconstructions(
                self.mae, imgs, self.run_dir / "reconstructions" / f"step{self.global_step:06d}.png"
            )

    def save_figures(self, run_dir: Path, dataset: torch.utils.data.Dataset, tag: str = "") -> list[Path]:
        n = min(4, len(dataset))
        imgs = torch.stack([dataset[(i, i)]["image"] for i in range(n)]).to(self.device)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        return [save_reconstructions(self.mae, imgs, run_dir / "reconstructions.png", g)]
