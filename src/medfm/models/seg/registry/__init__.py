"""Segmentation decoders by name, and the encoder+decoder model that picks one by encoder family."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medfm.errors import ConfigError
from medfm.registry import Registry

DECODERS: Registry[nn.Module] = Registry("segmentation decoder")


@DECODERS.register("unetr", help="UNETR decoder for ViT token maps (all at stride patch_size)")
def _unetr(**kw: Any) -> nn.Module:
    from medfm.models.seg.unetr import UNETRDecoder

    return UNETRDecoder(**kw)


@DECODERS.register("unet", help="U-Net decoder for multi-scale CNN / hybrid feature maps")
def _unet(**kw: Any) -> nn.Module:
    from medfm.models.seg.unet_decoder import UNetDecoder

    return UNetDecoder(**kw)


def decoder_for(family: str) -> str:
    """The decoder that fits an encoder family: token maps -> UNETR, multi-scale maps -> U-Net."""
    return "unetr" if family == "vit" else "unet"


class SegmentationModel(nn.Module):
    """encoder.forward_features(x) -> decoder(feats, x) -> logits (B, num_classes, *spatial of x).

    ``num_classes`` counts background: binary segmentation is 2 classes (softmax over classes throughout).
    """

    def __init__(
        self, encoder: nn.Module, decoder: nn.Module, num_classes: int, decoder_name: str = ""
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.decoder_name = decoder_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder.forward_features(x), x)


class BaselineModel(nn.Module):
    """Wraps a plain network (e.g. MONAI UNet) so it trains and infers like a SegmentationModel."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.encoder = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_segmentation_model(
    encoder: nn.Module, num_classes: int, decoder: str = "auto", feature_size: int = 16
) -> SegmentationModel:
    """Attach the decoder that fits ``encoder`` (or the named one)."""
    if num_classes < 2:
        raise ConfigError(f"num_classes must count background too (>= 2), got {num_classes}")
    name = decoder_for(getattr(encoder, "family", "cnn")) if decoder == "auto" else decoder
    if name not in DECODERS:
        raise ConfigError(f"unknown decoder '{name}'; known: {', '.join(DECODERS.names())}")
    dec = DECODERS.create(
        name,
        feature_dims=list(encoder.feature_dims),
        feature_strides=list(encoder.feature_strides),
        in_chans=int(encoder.in_chans),
        num_classes=num_classes,
        spatial_dims=int(encoder.spatial_dims),
        feature_size=feature_size,
    )
    return SegmentationModel(encoder, dec, num_classes, decoder_name=name)


def monai_unet(
    spatial_dims: int = 2,
    in_chans: int = 1,
    num_classes: int = 2,
    channels: tuple[int, ...] = (16, 32, 64, 128, 256),
) -> BaselineModel:
    """The MONAI UNet baseline (no foundation encoder), used to judge what pretraining buys."""
    from monai.networks.nets import UNet

    net = UNet(
        spatial_dims=spatial_dims,
        in_channels=in_chans,
        out_channels=num_classes,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
    )
    return BaselineModel(net, num_classes)
