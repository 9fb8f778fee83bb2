"""Dense segmentation decoders on tiny encoders: shapes (2D/3D, ViT/CNN), learning, losses, sliding window."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfm.errors import ConfigError
from medfm.models.base import Encoder
from medfm.models.registry import create_encoder
from medfm.models.seg import build_segmentation_model
from medfm.models.seg.registry import monai_unet
from medfm.tasks.segment.infer import predict_logits
from medfm.train.segmentation import seg_loss


class TinyCNN(Encoder):
    """A 4-stage conv encoder (strides 4, 8, 16, 32) standing in for convnext_lk_* in unit tests."""

    _family = "cnn"

    def __init__(self, spatial_dims: int = 2, in_chans: int = 1, width: int = 8) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.spatial_dims, self.in_chans = spatial_dims, in_chans
        self.feature_dims = [width, width * 2, width * 4, width * 8]
        self.feature_strides = [4, 8, 16, 32]
        self.embed_dim = width * 8
        chans = [in_chans, *self.feature_dims]
        self.stages = nn.ModuleList(
            nn.Sequential(conv(chans[i], chans[i + 1], 4 if i == 0 else 2, 4 if i == 0 else 2), nn.GELU())
            for i in range(4)
        )

    def forward_features(self, x):
        feats = []
        for s in self.stages:
            x = s(x)
            feats.append(x)
        return feats

    def forward(self, x):
        return self.forward_features(x)[-1].flatten(2).mean(-1)


def tiny_vit(spatial_dims=2, img=32, patch=8):
    return create_encoder(
        "vit_tiny",
        spatial_dims=spatial_dims,
        img_size=img,
        patch_size=patch,
        depth=2,
        embed_dim=32,
        num_heads=2,
    )


@pytest.mark.parametrize("dims,shape", [(2, (32, 32)), (2, (48, 40)), (3, (16, 16, 16))])
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_output_shape_matches_input(kind, dims, shape):
    enc = tiny_vit(dims, 16 if dims == 3 else 32) if kind == "vit" else TinyCNN(dims)
    model = build_segmentation_model(enc, num_classes=3, feature_size=8)
    assert model.decoder_name == ("unetr" if kind == "vit" else "unet")
    if kind == "cnn":
        shape = (64, 64) if dims == 2 else (32, 32, 32)  # a stride-32 encoder needs >= 32 px
    y = model(torch.rand(2, 1, *shape))
    assert y.shape == (2, 3, *shape)


def test_num_classes_must_count_background():
    with pytest.raises(ConfigError):
        build_segmentation_model(tiny_vit(), num_classes=1)


def test_unetr_rejects_multiscale_maps():
    with pytest.raises(ConfigError, match="power-of-two"):
        build_segmentation_model(TinyCNN(), num_classes=2, decoder="unetr")


@pytest.mark.parametrize("kind", ["vit", "cnn", "unet"])
def test_overfits_a_disk(kind):
    """A few dozen Adam steps on one image must fit a simple shape far above chance."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    mask = (((yy - 14) ** 2 + (xx - 18) ** 2) < 64).long()[None]
    img = (mask.float() * 0.6 + 0.2 + 0.05 * torch.randn(1, 32, 32))[None]
    if kind == "unet":
        model = monai_unet(2, 1, 2, channels=(8, 16, 32))
    else:
        model = build_segmentation_model(tiny_vit() if kind == "vit" else TinyCNN(width=8), 2, feature_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = seg_loss()
    first = None
    for _ in range(40):
        loss = loss_fn(model(img), mask[:, None])
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    pred = model(img).argmax(1)
    inter = float(((pred == 1) & (mask == 1)).sum())
    dice = 2 * inter / float((pred == 1).sum() + (mask == 1).sum())
    assert float(loss) < first * 0.6
    assert dice > 0.8, dice


def test_sliding_window_covers_large_image():
    """Sliding-window logits on an image 2x the window equal the model's own output where windows agree."""
    torch.manual_seed(0)
    model = nn.Conv2d(1, 2, 1)  # translation-equivariant: window seams cannot change the result
    x = torch.rand(1, 1, 64, 64)
    y = predict_logits(model, x, roi_size=(32, 32), overlap=0.5)
    assert y.shape == (1, 2, 64, 64)
    assert torch.allclose(y, model(x), atol=1e-5)
    y2 = predict_logits(model, x, roi_size=(32, 32), out_size=(128, 128))
    assert y2.shape == (1, 2, 128, 128)
