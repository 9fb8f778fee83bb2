"""SAM's image encoder (Kirillov et al. 2023): a ViT with windowed attention and decomposed relative position,
as a medfm ``Encoder``, plus the conv neck to 256 channels. Parameter names follow the official key layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfm.errors import ConfigError
from medfm.models.base import Encoder

SAM_PIXEL_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_PIXEL_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W)."""

    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class MLP(nn.Module):
    """``layers`` of Linear with ReLU between (SAM's hypernetwork / IoU head)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, depth: int) -> None:
        super().__init__()
        dims = [d_in] + [hidden] * (depth - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1, self.lin2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


# ---------------------------------------------------------------------------------------------------------
# Image encoder: ViT with windowed attention and decomposed relative positions
# ---------------------------------------------------------------------------------------------------------
def _rel_pos(q_size: int, k_size: int, rel: torch.Tensor) -> torch.Tensor:
    """Relative position table (q_size, k_size, C), interpolating the stored one when the grid changed."""
    n = 2 * max(q_size, k_size) - 1
    if rel.shape[0] != n:
        rel = F.interpolate(rel.T[None], size=n, mode="linear", align_corners=False)[0].T
    q = torch.arange(q_size, device=rel.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=rel.device)[None, :] * max(q_size / k_size, 1.0)
    idx = (q - k) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel[idx.long()]


class SAMAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, rel_size: tuple[int, int] | None) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.use_rel_pos = rel_size is not None
        if rel_size is not None:
            hd = dim // num_heads
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size[0] - 1, hd))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size[1] - 1, hd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            rh, rw = _rel_pos(h, h, self.rel_pos_h), _rel_pos(w, w, self.rel_pos_w)
            rq = q.reshape(-1, h, w, q.shape[-1])
            bias_h = torch.einsum("bhwc,hkc->bhwk", rq, rh)
            bias_w = torch.einsum("bhwc,wkc->bhwk", rq, rw)
            attn = (attn.view(-1, h, w, h, w) + bias_h[..., :, None] + bias_w[..., None, :]).view(
                -1, h * w, h * w
            )
        out = (
            (attn.softmax(-1) @ v)
            .view(b, self.num_heads, h, w, -1)
            .permute(0, 2, 3, 1, 4)
            .reshape(b, h, w, -1)
        )
        return self.proj(out)


class SAMBlock(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window: int, grid: tuple[int, int]
    ) -> None:
        super().__init__()
        self.window = window
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = SAMAttention(dim, num_heads, (window, window) if window else grid)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            b, h, w, c = y.shape
            s = self.window
            ph, pw = (s - h % s) % s, (s - w % s) % s
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            y = y.view(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
            y = self.attn(y)
            y = (
                y.view(b, hp // s, wp // s, s, s, c)
                .permute(0, 1, 3, 2, 4, 5)
                .reshape(b, hp, wp, c)[:, :h, :w]
            )
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)


class SAMImageEncoder(Encoder):
    """SAM's image encoder (its neck lives in PromptableSegmenter) as a 2D medfm ViT Encoder."""

    _family = "vit"

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.spatial_dims, self.in_chans, self.img_size = 2, in_chans, (img_size, img_size)
        self.patch_size, self.embed_dim = patch_size, embed_dim
        g = img_size // patch_size
        self.grid = (g, g)
        self.patch_embed = _PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, embed_dim))
        glob = set(global_attn_indexes)
        self.blocks = nn.ModuleList(
            SAMBlock(embed_dim, num_heads, mlp_ratio, 0 if i in glob else window_size, self.grid)
            for i in range(depth)
        )
        self.feature_indices = [max(0, (i + 1) * depth // 4 - 1) for i in range(4)]
        self.feature_dims, self.feature_strides = [embed_dim] * 4, [patch_size] * 4
        self.config = {
            "name": "sam_image_encoder",
            "img_size": img_size,
            "patch_size": patch_size,
            "in_chans": in_chans,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "window_size": window_size,
            "global_attn_indexes": sorted(glob),
        }
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        t = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        pos = self.pos_embed
        if t.shape[1:3] != pos.shape[1:3]:  # other input sizes: resize the absolute position grid
            pos = F.interpolate(
                pos.permute(0, 3, 1, 2), size=t.shape[1:3], mode="bicubic", align_corners=False
            ).permute(0, 2, 3, 1)
        t = t + pos
        feats = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            feats += [t.permute(0, 3, 1, 2)] * self.feature_indices.count(i)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1].mean((2, 3))


def make_neck(in_dim: int, out_dim: int = 256) -> nn.Sequential:
    """SAM's neck: 1x1 conv to ``out_dim``, LayerNorm2d, 3x3 conv, LayerNorm2d (keys neck.0..neck.3)."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, 1, bias=False),
        LayerNorm2d(out_dim),
        nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False),
        LayerNorm2d(out_dim),
    )


# ---------------------------------------------------------------------------------------------------------
# Prompt encoder
# ---------------------------------------------------------------------------------------------------------
