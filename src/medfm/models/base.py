"""What every medfm encoder provides, whatever its family (ViT, large-kernel CNN, hybrid; 2D or 3D)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Encoder(nn.Module):
    """Base class of all encoders in the registry.

    Subclasses set the attributes below in ``__init__`` and implement ``forward_features``.

    - ``forward(x)`` -> pooled embedding (B, embed_dim): the vector used by probes, kNN, retrieval.
    - ``forward_features(x)`` -> list of multi-scale feature maps [(B, C_i, *spatial_i)], shallow to deep,
      with channels ``feature_dims[i]`` and stride ``feature_strides[i]`` relative to the input; used by the
      segmentation decoders.
    - ``config`` -> {"name": registry name, **kwargs}: enough to rebuild the encoder with
      ``medfm.models.create_encoder(**config)`` (stored in a run directory's config.json).
    """

    spatial_dims: int = 2
    in_chans: int = 1
    img_size: tuple[int, ...] = (224, 224)
    embed_dim: int = 0
    feature_dims: list[int]
    feature_strides: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}
        self.feature_dims = []
        self.feature_strides = []

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_groups(self) -> list[nn.Module]:
        """The trunk's stages in input -> output order (stem / patch embedding first, final norm last).

        Every trainable trunk parameter is in exactly one group, so freezing the first k groups (tower
        locking) or giving group i its own learning rate (layer-wise decay) needs no attribute names.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define layer_groups()")

    @property
    def family(self) -> str:
        """'vit', 'cnn' or 'hybrid' — decides e.g. which segmentation decoder and LoRA targets fit."""
        return getattr(self, "_family", "cnn")


def param_group(*modules: nn.Module | None, **params: nn.Parameter | None) -> nn.Module:
    """One layer group made of ``modules`` plus loose ``params`` (e.g. a class token beside the patch embed).

    Built on demand and never stored on the encoder, so state-dict keys do not change.
    """
    group = nn.Module()
    for i, m in enumerate(m for m in modules if m is not None):
        group.add_module(str(i), m)
    for name, p in params.items():
        if p is not None:
            group.register_parameter(name, p)
    return group
