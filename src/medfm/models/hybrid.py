"""Hybrid encoders, 2D or 3D.

- ``hybrid_*`` (serial): a convolutional stem and two large-kernel conv stages (strides 4 and 8) capture
  local texture cheaply, then transformer blocks run on stride-16 tokens for global context.
- ``swin_tiny`` (hierarchical): MONAI's Swin Transformer (the SwinUNETR backbone), used as a library.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.errors import ConfigError
from medfm.models.base import Encoder, param_group
from medfm.models.convnext import ConvNeXtBlock, downsample
from medfm.models.layers import (
    LayerNormCF,
    check_dims,
    conv_nd,
    drop_path_rates,
    resize_pos_embed,
    sincos_pos_embed,
    to_tuple,
)
from medfm.models.registry import register_size
from medfm.models.vit import Block


class HybridViT(Encoder):
    """Conv stem + 2 conv stages, then a transformer on stride-16 tokens.

    Features: stage outputs at strides 4 and 8, transformer tokens (after the final norm) as a stride-16 map,
    and that map max-pooled to stride 32 (a simple feature pyramid, as in ViTDet). Pooled: mean of the
    normalised tokens.
    """

    _family = "hybrid"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int | tuple[int, ...] = 224,
        conv_dims: tuple[int, int] = (64, 128),
        conv_depths: tuple[int, int] = (2, 2),
        kernel_size: int = 7,
        embed_dim: int = 192,
        depth: int = 8,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        pos_embed: str = "sincos",
    ) -> None:
        super().__init__()
        self.spatial_dims = check_dims(spatial_dims)
        self.in_chans = int(in_chans)
        self.img_size = to_tuple(img_size, spatial_dims, "img_size")
        if any(s % 16 for s in self.img_size):
            raise ConfigError(f"img_size {list(self.img_size)} must be divisible by 16 for a hybrid encoder")
        if pos_embed not in ("sincos", "learned"):
            raise ConfigError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        self.embed_dim = int(embed_dim)
        self.patch_size = 16
        self.grid = tuple(s // 16 for s in self.img_size)
        self.pos_embed_type = pos_embed
        self.feature_dims = [int(conv_dims[0]), int(conv_dims[1]), self.embed_dim, self.embed_dim]
        self.feature_strides = [4, 8, 16, 32]
        c1, c2 = conv_dims
        n_conv = sum(conv_depths)
        dpr = drop_path_rates(drop_path_rate, n_conv + depth)
        conv = conv_nd(spatial_dims)
        self.stem = nn.Sequential(conv(in_chans, c1, kernel_size=4, stride=4), LayerNormCF(c1, eps=1e-6))
        self.stage1 = nn.Sequential(
            *[ConvNeXtBlock(c1, spatial_dims, kernel_size, drop_path=dpr[i]) for i in range(conv_depths[0])]
        )
        self.stage2 = nn.Sequential(
            downsample(spatial_dims, c1, c2),
            *[
                ConvNeXtBlock(c2, spatial_dims, kernel_size, drop_path=dpr[conv_depths[0] + i])
                for i in range(conv_depths[1])
            ],
        )
        self.to_tokens = downsample(spatial_dims, c2, embed_dim)
        self.pos_embed = nn.Parameter(
            sincos_pos_embed(self.grid, embed_dim).unsqueeze(0), requires_grad=pos_embed == "learned"
        )
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, True, dpr[n_conv + i]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d | nn.Conv3d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _pos(self, grid: tuple[int, ...]) -> torch.Tensor:
        if grid == self.grid:
            return self.pos_embed
        if self.pos_embed_type == "sincos":
            return sincos_pos_embed(grid, self.embed_dim).unsqueeze(0).to(self.pos_embed)
        return resize_pos_embed(self.pos_embed, self.grid, grid)

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f1 = self.stage1(self.stem(x))
        f2 = self.stage2(f1)
        t = self.to_tokens(f2)
        b, grid = t.shape[0], tuple(t.shape[2:])
        tok = t.flatten(2).transpose(1, 2) + self._pos(grid)
        for blk in self.blocks:
            tok = blk(tok)
        tok = self.norm(tok)
        return f1, f2, tok.transpose(1, 2).reshape(b, self.embed_dim, *grid)

    def layer_groups(self) -> list[nn.Module]:
        """Conv stem, the two conv stages, tokeniser (+ position embedding), each block, final norm."""
        tokens = param_group(self.to_tokens, pos_embed=self.pos_embed)
        return [self.stem, self.stage1, self.stage2, tokens, *self.blocks, self.norm]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1, f2, f3 = self._run(x)
        pool = F.max_pool2d if self.spatial_dims == 2 else F.max_pool3d
        return [f1, f2, f3, pool(f3, kernel_size=2, stride=2, ceil_mode=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)[2].flatten(2).mean(dim=2)


class SwinEncoder(Encoder):
    """MONAI's Swin Transformer (2D/3D). Features: the 4 stage outputs (strides 4-32); pooled: mean of the
    last stage + LayerNorm."""

    _family = "hybrid"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int | tuple[int, ...] = 224,
        embed_dim: int = 48,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.spatial_dims = check_dims(spatial_dims)
        self.in_chans = int(in_chans)
        self.img_size = to_tuple(img_size, spatial_dims, "img_size")
        if any(s % 32 for s in self.img_size):
            raise ConfigError(f"img_size {list(self.img_size)} must be divisible by 32 for swin")
        if len(depths) != 4 or len(num_heads) != 4:
            raise ConfigError("swin needs 4 depths and 4 num_heads")
        self.embed_dim = int(embed_dim) * 16
        self.feature_dims = [int(embed_dim) * 2**i for i in range(1, 5)]
        self.feature_strides = [4, 8, 16, 32]
        self.swin = SwinTransformer(
            in_chans=in_chans,
            embed_dim=embed_dim,
            window_size=(window_size,) * spatial_dims,
            patch_size=(2,) * spatial_dims,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            spatial_dims=spatial_dims,
        )
        self.norm = nn.LayerNorm(self.embed_dim)

    def layer_groups(self) -> list[nn.Module]:
        """Patch embedding, the four Swin stages, final norm."""
        sw = self.swin
        return [sw.patch_embed, sw.layers1, sw.layers2, sw.layers3, sw.layers4, self.norm]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.swin(x, normalize=True)[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_features(x)[-1].flatten(2).mean(dim=2))


_SIZES: dict[str, tuple[type[Encoder], dict[str, Any], str]] = {
    "hybrid_tiny": (
        HybridViT,
        dict(conv_dims=(64, 128), conv_depths=(2, 2), embed_dim=192, depth=8, num_heads=3),
        "Serial hybrid: conv stem + 2 large-kernel conv stages, 8 transformer blocks (192 dim)",
    ),
    "hybrid_small": (
        HybridViT,
        dict(conv_dims=(96, 192), conv_depths=(2, 2), embed_dim=384, depth=10, num_heads=6),
        "Serial hybrid: conv stem + 2 large-kernel conv stages, 10 transformer blocks (384 dim)",
    ),
    "swin_tiny": (
        SwinEncoder,
        dict(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)),
        "Hierarchical Swin Transformer (MONAI SwinUNETR backbone, 48 dim), 2D/3D, strides 4-32",
    ),
}


for _name, (_cls, _defaults, _help) in _SIZES.items():
    register_size(_cls, _name, _defaults, _help)
