"""MAE: pure functions (patchify, masking, loss), the module in 2D/3D, and that it learns on tiny data."""

from __future__ import annotations

import pytest
import torch

from medfm.errors import ConfigError
from medfm.models.registry import create_encoder
from medfm.train.mae import MAE, mae_loss, patchify, random_masking, save_reconstructions, unpatchify


def tiny_vit(spatial_dims: int = 2, img: int = 16, patch: int = 4, depth: int = 1, chans: int = 1):
    return create_encoder(
        "vit_tiny",
        spatial_dims=spatial_dims,
        in_chans=chans,
        img_size=img,
        patch_size=patch,
        depth=depth,
        embed_dim=32,
        num_heads=2,
    )


@pytest.mark.parametrize("dims,chans", [(2, 1), (2, 3), (3, 1)])
def test_patchify_roundtrip_and_token_order(dims: int, chans: int) -> None:
    size, p = 8, 4
    imgs = torch.randn(2, chans, *([size] * dims))
    x = patchify(imgs, p, dims)
    assert x.shape == (2, (size // p) ** dims, p**dims * chans)
    assert torch.equal(unpatchify(x, p, (size // p,) * dims, chans), imgs)
    # token k is the patch at row-major grid position k, pixels row-major with channels last
    g = size // p
    k = g**dims - 2
    pos = [(k // g ** (dims - 1 - a)) % g for a in range(dims)]
    patch = imgs[(0, slice(None), *(slice(q * p, (q + 1) * p) for q in pos))]
    assert torch.equal(x[0, k], patch.movedim(0, -1).reshape(-1))


def test_patch_order_matches_encoder_tokens() -> None:
    # A patch embedding that averages the pixels of a patch must see the same patch as patchify's token k.
    enc = tiny_vit(img=8, patch=4)
    with torch.no_grad():
        enc.patch_embed.weight.zero_()
        enc.patch_embed.weight[0] = 1.0 / 16
        enc.patch_embed.bias.zero_()
        enc.pos_embed.zero_()
    imgs = torch.rand(2, 1, 8, 8)
    tokens = enc.patch_tokens(imgs)[..., 0]
    assert torch.allclose(tokens, patchify(imgs, 4, 2).mean(-1), atol=1e-6)


def test_random_masking_properties() -> None:
    g = torch.Generator().manual_seed(0)
    ids_keep, mask, ids_restore = random_masking(3, 16, 0.75, g)
    assert ids_keep.shape == (3, 4) and mask.shape == (3, 16)
    assert torch.all(mask.sum(1) == 12)
    for b in range(3):
        assert torch.all(mask[b, ids_keep[b]] == 0)  # kept tokens are exactly the unmasked ones
        assert sorted(ids_keep[b].tolist()) == sorted(torch.nonzero(mask[b] == 0).flatten().tolist())
    shuffle = torch.argsort(ids_restore, 1)
    assert torch.equal(torch.gather(shuffle, 1, ids_restore), torch.arange(16).expand(3, 16))
    again = random_masking(3, 16, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ids_keep)
    other = random_masking(3, 16, 0.75, torch.Generator().manual_seed(1))
    assert not torch.equal(other[1], mask)


def test_mae_loss_counts_masked_patches_only() -> None:
    torch.manual_seed(0)
    target = torch.rand(2, 6, 12)
    pred = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    base = mae_loss(pred, target, mask, norm_pix=False)
    pred2 = pred.clone()
    pred2[mask == 0] += 5.0  # visible patches do not count
    assert torch.isclose(mae_loss(pred2, target, mask, norm_pix=False), base)
    manual = ((pred - target) ** 2).mean(-1)[mask == 1].mean()
    assert torch.isclose(base, manual)
    # norm_pix: per-patch affine changes of the target do not matter
    a = mae_loss(pred, target, mask, norm_pix=True)
    b = mae_loss(pred, target * 3.0 + 7.0, mask, norm_pix=True)
    assert torch.isclose(a, b, atol=1e-4)
    assert mae_loss(pred, target, torch.zeros_like(mask)) == 0


@pytest.mark.parametrize("dims", [2, 3])
def test_mae_forward_and_masked_only_head_agree(dims: int) -> None:
    torch.manual_seed(0)
    img = 16 if dims == 2 else 8
    mae = MAE(tiny_vit(dims, img=img, patch=4), decoder_dim=16, decoder_depth=1, decoder_heads=2)
    imgs = torch.rand(3, 1, *([img] * dims))
    loss, pred, mask = mae(imgs, torch.Generator().manual_seed(3))
    n = (img // 4) ** dims
    assert pred.shape == (3, n, 4**dims) and mask.shape == (3, n)
    assert torch.all(mask.sum(1) == n - round(n * 0.25))
    fast = mae.loss(imgs, torch.Generator().manual_seed(3))
    assert torch.isclose(fast, loss, atol=1e-5)
    fast.backward()
    assert mae.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert mae.encoder.patch_embed.weight.grad.abs().sum() > 0


def test_mae_learns_on_tiny_data(tmp_path) -> None:
    from medfm.train.synthetic import synthetic_images

    torch.manual_seed(0)
    imgs = torch.from_numpy(synthetic_images(16, 16, seed=1)).float() / 255
    mae = MAE(tiny_vit(img=16, patch=4), decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix=False)
    opt = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss = mae.loss(imgs, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3
    out = save_reconstructions(mae, imgs[:2], tmp_path / "rec.png", torch.Generator().manual_seed(0))
    assert out.is_file() and out.stat().st_size > 1000
    masked, recon = mae.reconstruct(imgs[:2], torch.Generator().manual_seed(0))
    assert recon.shape == imgs[:2].shape and float(recon.min()) >= 0 and float(recon.max()) <= 1
    assert (masked == 0).float().mean() > 0.5  # 75% of patches blanked


def test_mae_rejects_cnn_encoder() -> None:
    cnn = create_encoder(
        "convnext_lk_tiny",
        spatial_dims=2,
        in_chans=1,
        img_size=32,
        depths=[1, 1, 1, 1],
        dims=[8, 16, 32, 64],
        kernel_size=3,
    )
    with pytest.raises(ConfigError, match="token API"):
        MAE(cnn)
