"""torchvision CNNs as medfm encoders (2D): DenseNet (``densenet121``, the torchxrayvision backbone) and
ResNet in torchvision's own layout (``tv_resnet*``: torchxrayvision's ResNet-50, RadImageNet ports).

The networks are torchvision's module classes used as a library, so imported weights run through the very
code they were trained with. The state-dict keys are torchvision's (``features.*`` for DenseNet;
``conv1``, ``bn1``, ``layer1``-``layer4`` for ResNet) minus the classifier, which medfm keeps as a head.

medfm feeds encoders [0, 1] images, usually 1 channel. An imported model's own input convention lives in the
config, so every medfm command gets it without knowing the source: ``mean`` / ``std`` (one value, or one per
channel) give ``(x - mean) / std`` inside ``forward`` (torchxrayvision's [-1024, 1024] range is mean 0.5,
std 1/2048; ImageNet-style models use the ImageNet values), and a 1-channel image fed to a 3-channel model
is repeated to RGB first. ``None`` (the default) leaves the input as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.errors import ConfigError
from medfm.models.base import Encoder, param_group
from medfm.models.layers import to_tuple
from medfm.models.registry import register_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchxrayvision's scaling of a [0, 255] image to [-1024, 1024], written for a [0, 1] image:
# (x - 0.5) / (1/2048) = 2048 x - 1024 (both steps exact in float32: 2048 is a power of two).
XRV_MEAN, XRV_STD = (0.5,), (1.0 / 2048,)


class _TorchvisionCNN(Encoder):
    """Shared input handling: 2D only, grey -> RGB repeat, the source's mean / std."""

    _family = "cnn"

    def _setup_input(self, spatial_dims: int, in_chans: int, img_size: int | tuple[int, ...],
                     mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        if spatial_dims != 2:
            raise ConfigError(f"{type(self).__name__} (torchvision) is 2D only; "
                              f"got spatial_dims={spatial_dims}")
        self.spatial_dims = 2
        self.in_chans = int(in_chans)
        if self.in_chans < 1:
            raise ConfigError(f"in_chans must be >= 1, got {in_chans}")
        self.img_size = to_tuple(img_size, 2, "img_size")
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std, or neither")
        self.normalised = mean is not None
        if mean is not None and std is not None:
            m, s = [float(v) for v in mean], [float(v) for v in std]
            for what, v in (("mean", m), ("std", s)):
                if len(v) not in (1, self.in_chans):
                    raise ConfigError(f"{what} needs 1 or in_chans={self.in_chans} values, got {len(v)}")
            if min(s) <= 0:
                raise ConfigError(f"std must be positive, got {s}")
            # Not persistent: they come from the config, so the weight files keep the source's key set.
            self.register_buffer("input_mean", torch.tensor(m).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("input_std", torch.tensor(s).view(1, -1, 1, 1), persistent=False)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] image -> what the source network expects (channel repeat, then mean / std)."""
        if x.shape[1] == 1 and self.in_chans > 1:
            x = x.expand(-1, self.in_chans, *x.shape[2:])
        if self.normalised:
            x = (x - self.input_mean) / self.input_std
        return x


class DenseNet(_TorchvisionCNN):
    """torchvision's DenseNet trunk (``self.features``, keys as in torchvision / torchxrayvision).

    Features: the outputs of dense blocks 1-3 (strides 4, 8, 16; before the transition that halves their
    channels) and relu(norm5(block 4)) at stride 32. Pooled: relu + global average pool of the last block
    after ``norm5``, exactly torchvision's and torchxrayvision's ``features2``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int | tuple[int, ...] = 224,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models.densenet import DenseNet as TVDenseNet

        self._setup_input(spatial_dims, in_chans, img_size, mean, std)
        blocks = [int(b) for b in block_config]
        if len(blocks) != 4 or min(blocks) < 1:
            raise ConfigError(f"block_config needs 4 positive entries (layers per dense block), got {blocks}")
        net = TVDenseNet(int(growth_rate), tuple(blocks), int(num_init_features), int(bn_size),
                         float(drop_rate), num_classes=1, memory_efficient=bool(memory_efficient))
        if self.in_chans != 3:  # torchvision builds an RGB stem; torchxrayvision's takes 1 channel
            conv0 = nn.Conv2d(self.in_chans, int(num_init_features), 7, 2, 3, bias=False)
            nn.init.kaiming_normal_(conv0.weight)  # torchvision's init of its own convs
            net.features.conv0 = conv0
        self.features = net.features  # the classifier is dropped: a medfm head replaces it
        dims, c = [], int(num_init_features)
        for i, n in enumerate(blocks):
            c += n * int(growth_rate)
            dims.append(c)
            if i < 3:
                c //= 2
        self.feature_dims = dims
        self.feature_strides = [4, 8, 16, 32]
        self.embed_dim = dims[-1]

    def layer_groups(self) -> list[nn.Module]:
        """Stem (conv0 + norm0), dense blocks 1-3 each with its transition, block 4 with the final norm."""
        f = self.features
        return [param_group(f.conv0, f.norm0),
                param_group(f.denseblock1, f.transition1),
                param_group(f.denseblock2, f.transition2),
                param_group(f.denseblock3, f.transition3),
                param_group(f.denseblock4, f.norm5)]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.prepare_input(x)
        f = self.features
        x = f.pool0(f.relu0(f.norm0(f.conv0(x))))
        feats = []
        for i in range(1, 4):
            x = getattr(f, f"denseblock{i}")(x)
            feats.append(x)
            x = getattr(f, f"transition{i}")(x)
        feats.append(F.relu(f.norm5(f.denseblock4(x))))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same ops as torchvision / torchxrayvision (adaptive pool, not a mean) for bit-level parity.
        x = F.relu(self.features(self.prepare_input(x)))
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


class TorchvisionResNet(_TorchvisionCNN):
    """torchvision's ResNet trunk (keys ``conv1``, ``bn1``, ``layer1``-``layer4``; the ``fc`` is dropped).

    Features: the four stage outputs (strides 4-32); pooled: global average pool of the last stage.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int | tuple[int, ...] = 224,
        block: str = "bottleneck",
        layers: tuple[int, ...] = (3, 4, 6, 3),
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock, Bottleneck
        from torchvision.models.resnet import ResNet as TVResNet

        self._setup_input(spatial_dims, in_chans, img_size, mean, std)
        if block not in ("basic", "bottleneck"):
            raise ConfigError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        n = [int(v) for v in layers]
        if len(n) != 4 or min(n) < 1:
            raise ConfigError(f"layers needs 4 positive entries (blocks per stage), got {n}")
        cls = Bottleneck if block == "bottleneck" else BasicBlock
        net = TVResNet(cls, n, num_classes=1)
        if self.in_chans != 3:
            net.conv1 = nn.Conv2d(self.in_chans, 64, 7, 2, 3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.feature_dims = [64 * 2**i * cls.expansion for i in range(4)]
        self.feature_strides = [4, 8, 16, 32]
        self.embed_dim = self.feature_dims[-1]

    def layer_groups(self) -> list[nn.Module]:
        """Stem (conv1 + bn1), the four stages."""
        return [param_group(self.conv1, self.bn1), self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.prepare_input(x)))))
        feats = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.forward_features(x)[-1], (1, 1)).flatten(1)


_SIZES: dict[str, tuple[type[Encoder], dict[str, Any], str]] = {
    "densenet121": (
        DenseNet, dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
        "DenseNet-121 (torchvision; the torchxrayvision backbone), 2D only, 1024-d",
    ),
    **{
        f"tv_resnet{d}": (
            TorchvisionResNet, dict(block=b, layers=lay),
            f"ResNet-{d} in torchvision's layout (torchxrayvision / RadImageNet ports), 2D only, "
            f"{512 * (4 if b == 'bottleneck' else 1)}-d",
        )
        for d, b, lay in ((18, "basic", (2, 2, 2, 2)), (34, "basic", (3, 4, 6, 3)),
                          (50, "bottleneck", (3, 4, 6, 3)), (101, "bottleneck", (3, 4, 23, 3)),
                          (152, "bottleneck", (3, 8, 36, 3)))
    },
}

for _name, (_cls, _defaults, _help) in _SIZES.items():
    register_size(_cls, _name, _defaults, _help)


def tv_resnet_name(block: str, layers: Sequence[int]) -> str:
    """The registered ``tv_resnet*`` name of a (block, layers) architecture (tv_resnet50 if none fits:
    the config's ``layers`` then says what it is)."""
    for name, (_cls, d, _help) in _SIZES.items():
        if name.startswith("tv_resnet") and d["block"] == block and tuple(d["layers"]) == tuple(layers):
            return name
    return "tv_resnet50" if block == "bottleneck" else "tv_resnet18"
