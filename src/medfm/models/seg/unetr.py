"""UNETR-style decoder for ViT encoders (Hatamizadeh et al. 2022), any power-of-two patch, 2D or 3D.

A ViT gives four token maps, all at stride ``patch``. Skip level ``l`` (stride 2**l) is made by upsampling
one of the shallower maps with transposed convolutions (MONAI ``UnetrPrUpBlock``); the deepest map is decoded
upwards with ``UnetrUpBlock`` (deconv + concat skip + residual conv); stride 1 uses a conv block on the raw
image, which keeps boundaries sharp where the tokens are coarse.
"""

from __future__ import annotations

import math

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn

from medfm.errors import ConfigError


class UNETRDecoder(nn.Module):
    def __init__(
        self,
        feature_dims: list[int],
        feature_strides: list[int],
        in_chans: int,
        num_classes: int,
        spatial_dims: int = 2,
        feature_size: int = 16,
        norm_name: str = "instance",
    ) -> None:
        super().__init__()
        patch = int(feature_strides[-1])
        levels = int(round(math.log2(patch)))
        if 2**levels != patch or levels < 1 or len(set(feature_strides)) != 1:
            raise ConfigError(
                f"UNETR decoder needs equal power-of-two strides (ViT tokens); got {feature_strides}"
            )
        if len(feature_dims) < 2:
            raise ConfigError("UNETR decoder needs at least 2 feature maps")
        self.levels = levels
        hidden = feature_dims[-1]

        def ch(level: int) -> int:
            return feature_size * (2 ** min(level, 3))

        self.stem = UnetrBasicBlock(spatial_dims, in_chans, ch(0), 3, 1, norm_name, res_block=True)
        # skip level l (stride 2**l, 1 <= l < levels) comes from map -(1 + levels - l) (deeper for coarser).
        self.skips = nn.ModuleList()
        self.skip_index: list[int] = []
        n_maps = len(feature_dims)
        for level in range(levels - 1, 0, -1):
            idx = max(0, n_maps - 1 - (levels - level))
            self.skip_index.append(idx)
            self.skips.append(
                UnetrPrUpBlock(
                    spatial_dims,
                    feature_dims[idx],
                    ch(level),
                    levels - level - 1,
                    3,
                    1,
                    2,
                    norm_name,
                    conv_block=True,
                    res_block=True,
                )
            )
        self.ups = nn.ModuleList()
        in_ch = hidden
        for level in range(levels - 1, -1, -1):
            self.ups.append(UnetrUpBlock(spatial_dims, in_ch, ch(level), 3, 2, norm_name, res_block=True))
            in_ch = ch(level)
        self.out = UnetOutBlock(spatial_dims, ch(0), num_classes)

    def forward(self, feats: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        y = feats[-1]
        skips = [blk(feats[i]) for blk, i in zip(self.skips, self.skip_index)] + [self.stem(x)]
        for up, skip in zip(self.ups, skips):
            y = up(y, skip)
        return self.out(y)
