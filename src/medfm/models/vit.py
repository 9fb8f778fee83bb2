"""Vision Transformer encoder, 2D or 3D (one compact file, readable top to bottom).

Pre-norm blocks (LayerNorm -> fused-qkv attention via ``scaled_dot_product_attention`` -> LayerNorm -> MLP),
optional LayerScale (DINOv2) and stochastic depth, a class token, fixed sin-cos (MAE) or learned
(timm, DINOv2) position embedding. Parameter names follow timm's layout (``blocks.N.attn.qkv``,
``blocks.N.mlp.fc1``...) so converting external checkpoints is mostly renaming.

The token API (``patch_tokens`` / ``forward_tokens``) lets masked-image-modeling objectives run the
encoder on a visible subset of patches without touching its internals.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.errors import ConfigError
from medfm.models.base import Encoder, param_group
from medfm.models.layers import (
    DropPath,
    check_dims,
    conv_nd,
    drop_path_rates,
    resize_pos_embed,
    sincos_pos_embed,
    to_tuple,
)
from medfm.models.registry import register_size

# Largest attention matrix (batch x heads x N x N elements) the explicit form may materialise (256 MiB bf16).
_EXPLICIT_MAX = 2**27


def _explicit_is_faster(q: torch.Tensor) -> bool:
    """On CPU in bf16/fp16, two batched matmuls beat SDPA's flash kernel by 3-7x at ViT sequence lengths
    (its backward dominates an MAE step; measured in benchmarks/bench_mae.py); fp32 and GPUs keep SDPA."""
    b, h, n, _ = q.shape
    low = q.dtype in (torch.bfloat16, torch.float16)
    return q.device.type == "cpu" and low and b * h * n * n <= _EXPLICIT_MAX


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # Set by ``recording_attention``: a plain attribute, so state-dict keys are unchanged.
        self.attn_record: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (3, B, heads, N, head_dim) in one reshape/permute; SDPA picks the fastest kernel available.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.attn_record is None and not _explicit_is_faster(q):
            x = F.scaled_dot_product_attention(q, k, v)
        else:  # SDPA does not return its weights; the explicit form computes the same attention
            # softmax in float32: bf16 logits would lose the small differences between tokens
            attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).float().softmax(dim=-1).to(q.dtype)
            if self.attn_record is not None:
                self.attn_record.append(attn)
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


@contextmanager
def recording_attention(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the attention weights (B, heads, N, N) of every ``Attention`` in ``module``, in call order.

    ``with recording_attention(enc) as attns: enc(x)`` — used by attention rollout; outside the block the
    encoder runs the fused kernel again.
    """
    record: list[torch.Tensor] = []
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    for m in layers:
        m.attn_record = record
    try:
        yield record
    finally:
        for m in layers:
            m.attn_record = None


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT/DINOv2); keeps deep ViTs stable early in training."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def feature_block_indices(depth: int, n: int = 4) -> list[int]:
    """Evenly spaced block indices whose outputs form the multi-scale features (2,5,8,11 for depth 12)."""
    return [max(math.ceil(depth * (i + 1) / n) - 1, 0) for i in range(n)]


class VisionTransformer(Encoder):
    """ViT encoder for 2D images or 3D volumes.

    ``forward(x)`` -> (B, embed_dim) pooled (class token after the final norm, or mean of patch tokens with
    ``global_pool="avg"``); ``forward_features(x)`` -> 4 maps (B, embed_dim, *grid) from evenly spaced blocks.
    """

    _family = "vit"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int | tuple[int, ...] = 224,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
        pos_embed: str = "sincos",
        layer_scale: float | None = None,
        num_register_tokens: int = 0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_dims(spatial_dims)
        self.in_chans = int(in_chans)
        self.img_size = to_tuple(img_size, spatial_dims, "img_size")
        self.patch_size = int(patch_size)
        if any(s % self.patch_size for s in self.img_size):
            raise ConfigError(f"img_size {list(self.img_size)} is not divisible by patch_size {patch_size}")
        if global_pool not in ("token", "avg"):
            raise ConfigError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if pos_embed not in ("sincos", "learned"):
            raise ConfigError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.grid = tuple(s // self.patch_size for s in self.img_size)
        self.num_patches = math.prod(self.grid)
        self.embed_dim = int(embed_dim)
        self.global_pool = global_pool
        self.pos_embed_type = pos_embed
        self.num_register_tokens = int(num_register_tokens)
        self.feature_indices = feature_block_indices(depth)
        self.feature_dims = [self.embed_dim] * 4
        self.feature_strides = [self.patch_size] * 4

        d = self.embed_dim
        self.patch_embed = conv_nd(spatial_dims)(in_chans, d, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        learned = pos_embed == "learned"
        # Kept as parameters in both modes so checkpoints have the same keys; sin-cos ones are frozen.
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d), requires_grad=learned)
        self.pos_embed = nn.Parameter(sincos_pos_embed(self.grid, d).unsqueeze(0), requires_grad=learned)
        self.reg_tokens = (
            nn.Parameter(torch.zeros(1, self.num_register_tokens, d)) if num_register_tokens else None
        )
        dpr = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(d, num_heads, mlp_ratio, qkv_bias, dpr[i], layer_scale, norm_eps) for i in range(depth)
        )
        self.norm = nn.LayerNorm(d, eps=norm_eps)
        self._init_weights(learned)

    def _init_weights(self, learned_pos: bool) -> None:
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over the flattened patch (MAE)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        if learned_pos:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_pos, std=0.02)
        if self.reg_tokens is not None:
            nn.init.normal_(self.reg_tokens, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- token API (used by MAE and friends) -------------------------------------------------------
    def pos_embed_for(self, grid: tuple[int, ...]) -> torch.Tensor:
        """Position embedding (1, prod(grid), D) for a patch grid, recomputed or interpolated if needed."""
        grid = tuple(grid)
        if grid == self.grid:
            return self.pos_embed
        if self.pos_embed_type == "sincos":
            return sincos_pos_embed(grid, self.embed_dim).unsqueeze(0).to(self.pos_embed)
        return resize_pos_embed(self.pos_embed, self.grid, grid)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, N, D) patch embeddings plus position embedding (no class token)."""
        t = self.patch_embed(x)
        grid = tuple(t.shape[2:])
        return t.flatten(2).transpose(1, 2) + self.pos_embed_for(grid)

    def _prepend(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        parts = [(self.cls_token + self.cls_pos).expand(b, -1, -1)]
        if self.reg_tokens is not None:
            parts.append(self.reg_tokens.expand(b, -1, -1))
        return torch.cat([*parts, tokens], dim=1)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N', D) patch tokens (any subset) -> (B, 1 + N', D) after all blocks and the final norm."""
        x = self._prepend(tokens)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        r = self.num_register_tokens
        return torch.cat([x[:, :1], x[:, 1 + r :]], dim=1) if r else x

    # ---- Encoder API ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.forward_tokens(self.patch_tokens(x))
        return t[:, 0] if self.global_pool == "token" else t[:, 1:].mean(dim=1)

    def layer_groups(self) -> list[nn.Module]:
        """Patch embedding (+ class/register tokens, position embeddings), each block, final norm."""
        stem = param_group(
            self.patch_embed,
            cls_token=self.cls_token,
            cls_pos=self.cls_pos,
            pos_embed=self.pos_embed,
            reg_tokens=self.reg_tokens,
        )
        return [stem, *self.blocks, self.norm]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        t = self.patch_embed(x)
        b, grid = t.shape[0], tuple(t.shape[2:])
        x = self._prepend(t.flatten(2).transpose(1, 2) + self.pos_embed_for(grid))
        skip = 1 + self.num_register_tokens
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            for _ in range(self.feature_indices.count(i)):
                feats.append(x[:, skip:].transpose(1, 2).reshape(b, self.embed_dim, *grid))
        return feats


_SIZES: dict[str, dict[str, Any]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}
_HELP = {
    "vit_tiny": "ViT-Tiny (192 dim, 12 blocks, 3 heads), 2D/3D, patch 16",
    "vit_small": "ViT-Small (384 dim, 12 blocks, 6 heads), 2D/3D, patch 16",
    "vit_base": "ViT-Base (768 dim, 12 blocks, 12 heads), 2D/3D, patch 16",
    "vit_large": "ViT-Large (1024 dim, 24 blocks, 16 heads), 2D/3D, patch 16",
}


for _name, _defaults in _SIZES.items():
    register_size(VisionTransformer, _name, _defaults, _HELP[_name])
