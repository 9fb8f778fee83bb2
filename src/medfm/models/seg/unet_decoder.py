"""U-Net-style decoder for CNN and hybrid encoders: upsample, concatenate the skip, two conv blocks; repeat.

Encoders give maps at strides like 4, 8, 16, 32. Below the shallowest stride the decoder keeps halving the
stride (x2 upsampling + conv) down to 1, where it meets a small conv stem on the raw image, so masks have
full-resolution boundaries even though the encoder never saw stride 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock
from torch import nn


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class UNetDecoder(nn.Module):
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
        nd = spatial_dims
        widths = [max(feature_size, d // 2) for d in feature_dims]  # decoder width at each encoder scale
        self.blocks = nn.ModuleList()
        in_ch = feature_dims[-1]
        for i in range(len(feature_dims) - 2, -1, -1):
            self.blocks.append(UnetBasicBlock(nd, in_ch + feature_dims[i], widths[i], 3, 1, norm_name))
            in_ch = widths[i]
        # Extra x2 stages from the shallowest encoder stride down to stride 1.
        n_extra = max(0, int(round(math.log2(max(1, feature_strides[0])))))
        self.extra = nn.ModuleList()
        stem_ch = feature_size
        for k in range(n_extra):
            out_ch = max(feature_size, in_ch // 2)
            last = k == n_extra - 1
            self.extra.append(UnetBasicBlock(nd, in_ch + (stem_ch if last else 0), out_ch, 3, 1, norm_name))
            in_ch = out_ch
        self.stem = UnetBasicBlock(nd, in_chans, stem_ch, 3, 1, norm_name)
        self.n_extra = n_extra
        self.out = UnetOutBlock(nd, in_ch if n_extra else in_ch + stem_ch, num_classes)

    def forward(self, feats: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        y = feats[-1]
        for blk, skip in zip(self.blocks, reversed(feats[:-1])):
            y = blk(torch.cat([_resize(y, skip.shape[2:]), skip], dim=1))
        stem = self.stem(x)
        full = tuple(x.shape[2:])
        for k, blk in enumerate(self.extra):
            last = k == self.n_extra - 1
            size = full if last else tuple(max(1, s // 2 ** (self.n_extra - 1 - k)) for s in full)
            y = _resize(y, size)
            y = blk(torch.cat([y, stem], dim=1) if last else y)
        if not self.n_extra:
            y = torch.cat([_resize(y, full), stem], dim=1)
        return self.out(y)
