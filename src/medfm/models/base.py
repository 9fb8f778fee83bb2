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

    @property
    def family(self) -> str:
        """'vit', 'cnn' or 'hybrid' — decides e.g. which segmentation decoder and LoRA targets fit."""
        return getattr(self, "_family", "cnn")
