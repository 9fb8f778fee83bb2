"""Large-kernel ConvNeXt encoder, 2D or 3D.

ConvNeXt layout (patchify stem, 4 stages at strides 4/8/16/32, blocks = depthwise conv -> LayerNorm ->
pointwise MLP -> layer scale -> drop path) with a configurable depthwise kernel (7..31): large kernels give
CNNs the wide receptive field that anatomy needs without attention's cost. Parameter names follow timm's
ConvNeXt, so timm ConvNeXt checkpoints load by renaming ``head.norm`` only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medfm.errors import ConfigError
from medfm.models.base import Encoder
from medfm.models.layers import DropPath, LayerNormCF, check_dims, conv_nd, drop_path_rates, to_tuple
from medfm.models.registry import register_size
from medfm.models.vit import Mlp


class ConvNeXtBlock(nn.Module):
    """Depthwise conv (same padding) -> LayerNorm -> MLP -> layer scale, residual with drop path."""

    def __init__(
        self,
        dim: int,
        spatial_dims: int,
        kernel_size: int,
        mlp_ratio: float = 4.0,
        layer_scale: float | None = 1e-6,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv_dw = conv_nd(spatial_dims)(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv_dw(x).movedim(1, -1)))  # channels-last for the norm and the MLP
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.movedim(-1, 1))


class Stage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def downsample(spatial_dims: int, cin: int, cout: int) -> nn.Sequential:
    """LayerNorm + 2x2 stride-2 conv between stages (ConvNeXt's separate downsampling layer)."""
    return nn.Sequential(
        LayerNormCF(cin, eps=1e-6), conv_nd(spatial_dims)(cin, cout, kernel_size=2, stride=2)
    )


class ConvNeXtLK(Encoder):
    """Large-kernel ConvNeXt: features = the 4 stage outputs (strides 4-32); pooled = mean + LayerNorm."""

    _family = "cnn"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int | tuple[int, ...] = 224,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        kernel_size: int = 13,
        mlp_ratio: float = 4.0,
        layer_scale: float | None = 1e-6,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_dims(spatial_dims)
        self.in_chans = int(in_chans)
        self.img_size = to_tuple(img_size, spatial_dims, "img_size")
        if len(depths) != 4 or len(dims) != 4:
            raise ConfigError(
                f"depths and dims need 4 entries (one per stage), got {list(depths)}, {list(dims)}"
            )
        if kernel_size % 2 == 0 or kernel_size < 3:
            raise ConfigError(f"kernel_size must be odd and >= 3 for 'same' padding, got {kernel_size}")
        self.embed_dim = int(dims[-1])
        self.feature_dims = [int(d) for d in dims]
        self.feature_strides = [4, 8, 16, 32]
        conv = conv_nd(spatial_dims)
        self.stem = nn.Sequential(
            conv(in_chans, dims[0], kernel_size=4, stride=4), LayerNormCF(dims[0], eps=1e-6)
        )
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        stages, k = [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            down = nn.Identity() if i == 0 else downsample(spatial_dims, dims[i - 1], dim)
            blocks = [
                ConvNeXtBlock(dim, spatial_dims, kernel_size, mlp_ratio, layer_scale, dpr[k + j])
                for j in range(depth)
            ]
            stages.append(Stage(down, blocks))
            k += depth
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.apply(_init)

    def layer_groups(self) -> list[nn.Module]:
        """Stem, the four stages (each with its downsampling), final norm."""
        return [self.stem, *self.stages, self.norm]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x.flatten(2).mean(dim=2))


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d | nn.Conv3d | nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


_SIZES: dict[str, dict[str, Any]] = {
    "convnext_lk_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnext_lk_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
}
_HELP = {
    "convnext_lk_tiny": "Large-kernel ConvNeXt-T (depths 3-3-9-3, kernel 13), 2D/3D, strides 4-32",
    "convnext_lk_small": "Large-kernel ConvNeXt-S (depths 3-3-27-3, kernel 13), 2D/3D, strides 4-32",
}


for _name, _defaults in _SIZES.items():
    register_size(ConvNeXtLK, _name, _defaults, _HELP[_name])


def timm_convnext_to_medfm(
    sd: dict[str, torch.Tensor], overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """timm ConvNeXt state dict (2D, 4x4 patchify stem) -> (medfm config, state dict, no grid)."""
    dims = [sd[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0] for i in range(4)]
    depths = [len({k.split(".")[3] for k in sd if k.startswith(f"stages.{i}.blocks.")}) for i in range(4)]
    out = {}
    for k, v in sd.items():
        if k.startswith("head.fc.") or k.startswith("head.pre_logits"):
            continue  # the classifier is not part of the encoder
        if k.endswith(("mlp.fc1.weight", "mlp.fc2.weight")) and v.ndim > 2:
            v = v.flatten(1)  # conv_mlp=True variants use 1x1 convs: the same maps as Linear layers
        out["norm." + k.removeprefix("head.norm.") if k.startswith("head.norm.") else k] = v
    cfg = dict(
        name="convnext_lk_tiny" if depths[2] <= 9 else "convnext_lk_small",
        spatial_dims=2,
        in_chans=sd["stem.0.weight"].shape[1],
        depths=tuple(depths),
        dims=tuple(dims),
        kernel_size=sd["stages.0.blocks.0.conv_dw.weight"].shape[-1],
        mlp_ratio=sd["stages.0.blocks.0.mlp.fc1.weight"].shape[0] / dims[0],
        layer_scale=1.0 if "stages.0.blocks.0.gamma" in sd else None,
    )
    return cfg, out, None
