"""ResNets (2D/3D): the CNN reference of medical imaging papers (MedMNIST baselines are ResNet-18/50).

``small_input=True`` replaces the 7x7/2 stem and max-pool with a 3x3/1 stem, as the MedMNIST and CIFAR
ResNets do for 28-32 px images; the four stages then have strides 1-8 instead of 4-32. ``width`` scales
all channel counts (64 = the usual ResNet). Batch norm everywhere, zero-initialised last norm of each
residual branch (each block starts as the identity, which helps from-scratch training on small data).

``global_pool`` picks how the last feature map becomes one vector: ``"avg"`` (the usual), ``"max"``, or
``"gem"`` (generalised mean with a learnable exponent p, starting at 3). Averaging dilutes a finding that
fills one cell of the last map (a 3 px nodule at 128 px input sits in one of 4x4 cells); max and GeM keep it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medfm.errors import ConfigError
from medfm.models.base import Encoder, param_group
from medfm.models.layers import check_dims, conv_nd, to_tuple
from medfm.models.registry import register_size


def _bn(spatial_dims: int, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if spatial_dims == 2 else nn.BatchNorm3d(c)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, sd: int, cin: int, width: int, stride: int) -> None:
        super().__init__()
        conv = conv_nd(sd)
        cout = width * self.expansion
        self.branch = nn.Sequential(
            conv(cin, width, 3, stride, 1, bias=False), _bn(sd, width), nn.ReLU(inplace=True),
            conv(width, cout, 3, 1, 1, bias=False), _bn(sd, cout),
        )  # fmt: skip
        self.short = _shortcut(sd, cin, cout, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.branch(x) + self.short(x))


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, sd: int, cin: int, width: int, stride: int) -> None:
        nn.Module.__init__(self)
        conv = conv_nd(sd)
        cout = width * self.expansion
        self.branch = nn.Sequential(
            conv(cin, width, 1, bias=False), _bn(sd, width), nn.ReLU(inplace=True),
            conv(width, width, 3, stride, 1, bias=False), _bn(sd, width), nn.ReLU(inplace=True),
            conv(width, cout, 1, bias=False), _bn(sd, cout),
        )  # fmt: skip
        self.short = _shortcut(sd, cin, cout, stride)
        self.act = nn.ReLU(inplace=True)


def _shortcut(sd: int, cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(conv_nd(sd)(cin, cout, 1, stride, bias=False), _bn(sd, cout))


class GeM(nn.Module):
    """Generalised mean over all positions: (mean x^p)^(1/p), p learnable (1 = avg, inf = max)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)  # below 1 it stops being a mean of the activations
        x = x.flatten(2).clamp(min=self.eps)
        # Scaled by the max so that x^p neither underflows nor overflows in float32 / bf16 for large p.
        m = x.amax(2, keepdim=True).detach()
        return (x / m).pow(p).mean(2).pow(1.0 / p) * m.squeeze(2)


_POOLS = ("avg", "max", "gem")


class ResNet(Encoder):
    """ResNet encoder: features = the 4 stage outputs; pooled = ``global_pool`` of the last stage."""

    _family = "cnn"

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int | tuple[int, ...] = 224,
        block: str = "basic",
        layers: tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
        small_input: bool = False,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.spatial_dims = check_dims(spatial_dims)
        self.in_chans = int(in_chans)
        self.img_size = to_tuple(img_size, spatial_dims, "img_size")
        if block not in ("basic", "bottleneck"):
            raise ConfigError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if len(layers) != 4 or min(layers) < 1:
            raise ConfigError(f"layers needs 4 positive entries (blocks per stage), got {list(layers)}")
        if global_pool not in _POOLS:
            raise ConfigError(f"global_pool must be one of {', '.join(_POOLS)}; got {global_pool!r}")
        self.global_pool = global_pool
        cls = BasicBlock if block == "basic" else Bottleneck
        sd, conv = spatial_dims, conv_nd(spatial_dims)
        if small_input:
            self.stem = nn.Sequential(
                conv(in_chans, width, 3, 1, 1, bias=False), _bn(sd, width), nn.ReLU(True)
            )
            strides = [1, 2, 4, 8]
        else:
            pool = nn.MaxPool2d(3, 2, 1) if sd == 2 else nn.MaxPool3d(3, 2, 1)
            self.stem = nn.Sequential(
                conv(in_chans, width, 7, 2, 3, bias=False), _bn(sd, width), nn.ReLU(True), pool
            )
            strides = [4, 8, 16, 32]
        stages, cin = [], width
        for i, n in enumerate(layers):
            w = width * 2**i
            blocks = [cls(sd, cin if j == 0 else w * cls.expansion, w, 2 if (j == 0 and i > 0) else 1)
                      for j in range(n)]  # fmt: skip
            cin = w * cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.embed_dim = cin
        self.feature_dims = [width * 2**i * cls.expansion for i in range(4)]
        self.feature_strides = strides
        self._init_weights()
        if global_pool == "gem":  # after init: _init_weights only touches convs and norms
            self.gem = GeM()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.branch[-1].weight)

    def layer_groups(self) -> list[nn.Module]:
        """Stem, the four stages; the GeM exponent (if any) goes with the last group."""
        groups: list[nn.Module] = [self.stem, *self.stages]
        if self.global_pool == "gem":
            groups[-1] = param_group(self.stages[-1], self.gem)
        return groups

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x)[-1]
        if self.global_pool == "gem":
            return self.gem(f)
        return f.flatten(2).amax(2) if self.global_pool == "max" else f.flatten(2).mean(2)


_SIZES: dict[str, dict[str, Any]] = {
    "resnet18": dict(block="basic", layers=(2, 2, 2, 2)),
    "resnet34": dict(block="basic", layers=(3, 4, 6, 3)),
    "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3)),
}
_HELP = {
    "resnet18": "ResNet-18 (basic blocks 2-2-2-2, 512-d), 2D/3D; small_input=True for 28-64 px images",
    "resnet34": "ResNet-34 (basic blocks 3-4-6-3, 512-d), 2D/3D",
    "resnet50": "ResNet-50 (bottlenecks 3-4-6-3, 2048-d), 2D/3D",
}


for _name, _defaults in _SIZES.items():
    register_size(ResNet, _name, _defaults, _HELP[_name])
