"""Encoder registry: every encoder builds tiny in 2D and 3D and honours the documented shapes and config."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from medfm.errors import ConfigError
from medfm.models import create_encoder, list_encoders
from medfm.models.layers import sincos_pos_embed
from medfm.models.vit import feature_block_indices

TINY = {
    "vit_tiny": dict(depth=2, patch_size=8),
    "vit_small": dict(depth=2, patch_size=8, embed_dim=48, num_heads=2),
    "vit_base": dict(depth=2, patch_size=8, embed_dim=48, num_heads=4),
    "vit_large": dict(depth=2, patch_size=8, embed_dim=48, num_heads=4),
    "convnext_lk_tiny": dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    "convnext_lk_small": dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), kernel_size=7),
    "hybrid_tiny": dict(conv_dims=(16, 32), conv_depths=(1, 1), embed_dim=64, depth=2, num_heads=2),
    "hybrid_small": dict(conv_dims=(16, 32), conv_depths=(1, 1), embed_dim=64, depth=2, num_heads=2),
    "swin_tiny": dict(embed_dim=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4),
    "resnet18": dict(width=8),
    "resnet34": dict(width=8, layers=(1, 1, 1, 1)),
    "resnet50": dict(width=8, layers=(1, 1, 1, 1)),
}
FAMILY = {"vit": "vit", "convnext": "cnn", "hybrid": "hybrid", "swin": "hybrid"}
FAMILY |= {"resnet18": "cnn", "resnet34": "cnn", "resnet50": "cnn"}
SIZE = {2: 64, 3: 32}


# Encoders built by a library for 2D only (torchvision, transformers), with their tiny configs.
_HF_TINY = {"model_type": "convnext", "hidden_sizes": [8, 16, 16, 32], "depths": [1, 1, 1, 1]}
TINY_2D = {
    "densenet121": dict(growth_rate=8, block_config=(1, 1, 1, 1), num_init_features=16),
    "tv_resnet18": dict(layers=(1, 1, 1, 1)),
    "tv_resnet34": dict(layers=(1, 1, 1, 1)),
    "tv_resnet50": dict(layers=(1, 1, 1, 1)),
    "tv_resnet101": dict(layers=(1, 1, 1, 1)),
    "tv_resnet152": dict(layers=(1, 1, 1, 1)),
    "hf_vision": dict(hf_config=_HF_TINY),
}


def test_registry_has_every_family():
    names = list_encoders()
    assert set(TINY) | set(TINY_2D) == set(names), "a registered encoder has no tiny test config"
    assert list_encoders("vit*") == ["vit_base", "vit_large", "vit_small", "vit_tiny"]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", sorted(TINY))
def test_encoder_shapes_and_rebuild(name, spatial_dims):
    torch.manual_seed(0)
    size = SIZE[spatial_dims]
    enc = create_encoder(name, spatial_dims=spatial_dims, in_chans=2, img_size=size, **TINY[name]).eval()
    assert enc.family == FAMILY[name.split("_")[0]]
    assert enc.spatial_dims == spatial_dims and enc.in_chans == 2 and enc.img_size == (size,) * spatial_dims
    x = torch.randn(2, 2, *([size] * spatial_dims))
    with torch.no_grad():
        pooled = enc(x)
        feats = enc.forward_features(x)
    assert pooled.shape == (2, enc.embed_dim)
    assert torch.isfinite(pooled).all() and pooled.std() > 0
    assert len(feats) == len(enc.feature_dims) == len(enc.feature_strides) >= 3
    for f, c, s in zip(feats, enc.feature_dims, enc.feature_strides):
        assert f.shape == (2, c, *[-(-size // s)] * spatial_dims), (f.shape, c, s)
    # The config alone rebuilds the same architecture; same weights -> same outputs.
    again = create_encoder(**enc.config).eval()
    again.load_state_dict(enc.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), pooled)


@pytest.mark.parametrize("name", sorted(TINY_2D))
def test_library_built_2d_encoders(name):
    torch.manual_seed(0)
    enc = create_encoder(name, in_chans=1, img_size=64, **TINY_2D[name]).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        pooled, feats = enc(x), enc.forward_features(x)
    assert pooled.shape == (2, enc.embed_dim) and torch.isfinite(pooled).all()
    assert len(feats) == len(enc.feature_dims) == len(enc.feature_strides) >= 3
    for f, c, s in zip(feats, enc.feature_dims, enc.feature_strides):
        assert f.shape == (2, c, 64 // s, 64 // s), (f.shape, c, s)
    again = create_encoder(**enc.config).eval()
    again.load_state_dict(enc.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), pooled)
    with pytest.raises(ConfigError):
        create_encoder(name, spatial_dims=3, **TINY_2D[name])


def test_resnet_small_input_keeps_resolution_for_tiny_images():
    """MedMNIST-style ResNet for 28 px: 3x3 stride-1 stem, no max-pool, stages at strides 1-8."""
    enc = create_encoder("resnet18", img_size=28, small_input=True, width=8).eval()
    feats = enc.forward_features(torch.rand(2, 1, 28, 28))
    assert [f.shape[-1] for f in feats] == [28, 14, 7, 4] and enc.feature_strides == [1, 2, 4, 8]
    assert enc.embed_dim == 64
    with pytest.raises(ConfigError, match="block"):
        create_encoder("resnet18", block="wide")


def test_resnet_global_pool_choices():
    """avg / max / GeM of the last map; GeM at p=1 is the average, large p approaches the max."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 96, 96)  # last map 3x3
    encs = {g: create_encoder("resnet18", img_size=96, width=8, global_pool=g).eval()
            for g in ("avg", "max", "gem")}
    for e in encs.values():
        e.load_state_dict(encs["avg"].state_dict(), strict=False)
    with torch.no_grad():
        fmap = encs["avg"].forward_features(x)[-1].flatten(2)
        assert torch.allclose(encs["avg"](x), fmap.mean(2))
        assert torch.allclose(encs["max"](x), fmap.amax(2))
        gem = encs["gem"]
        assert gem.gem.p.requires_grad and gem.config["global_pool"] == "gem"
        gem.gem.p.fill_(1.0)
        assert torch.allclose(gem(x), fmap.clamp(min=1e-6).mean(2), atol=1e-5)
        gem.gem.p.fill_(200.0)
        assert torch.allclose(gem(x), fmap.amax(2), rtol=0.1, atol=1e-3)
        again = create_encoder(**gem.config).eval()
        again.load_state_dict(gem.state_dict())
        assert torch.equal(again(x), gem(x))
    with pytest.raises(ConfigError, match="global_pool"):
        create_encoder("resnet18", global_pool="median")


def test_vit_token_api_and_pooling():
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", spatial_dims=2, in_chans=1, img_size=32, patch_size=8, depth=2).eval()
    assert enc.patch_size == 8 and enc.grid == (4, 4) and enc.num_patches == 16
    assert enc.pos_embed.shape == (1, 16, 192) and not enc.pos_embed.requires_grad  # fixed sin-cos
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        tok = enc.patch_tokens(x)
        assert tok.shape == (3, 16, 192)
        full = enc.forward_tokens(tok)
        assert full.shape == (3, 17, 192)
        assert torch.allclose(full[:, 0], enc(x))
        visible = enc.forward_tokens(tok[:, [0, 5, 9]])  # MAE's visible subset
        assert visible.shape == (3, 4, 192)
        # A different input size re-derives the position embedding for the new grid.
        assert enc.patch_tokens(torch.randn(1, 1, 48, 40)).shape == (1, 30, 192)
        assert enc(torch.randn(1, 1, 48, 40)).shape == (1, 192)
    avg = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=2, global_pool="avg").eval()
    avg.load_state_dict(enc.state_dict())
    with torch.no_grad():
        assert torch.allclose(avg(x), avg.forward_tokens(avg.patch_tokens(x))[:, 1:].mean(1))


def test_vit_options_learned_pos_layer_scale_registers_drop_path():
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=2, pos_embed="learned", layer_scale=0.1,
                         num_register_tokens=2, drop_path_rate=0.5)
    assert enc.pos_embed.requires_grad and enc.blocks[0].ls1.gamma.shape == (192,)
    x = torch.randn(2, 1, 32, 32)
    assert enc.forward_tokens(enc.patch_tokens(x)).shape == (2, 17, 192)  # register tokens are dropped
    enc.eval()
    with torch.no_grad():
        assert torch.equal(enc(x), enc(x))  # drop path is off in eval
        assert enc(torch.randn(1, 1, 64, 64)).shape == (1, 192)  # learned pos-emb interpolated
    enc.train()
    enc(x).sum().backward()
    assert enc.patch_embed.weight.grad is not None and enc.pos_embed.grad is not None


def test_feature_blocks_evenly_spaced():
    assert feature_block_indices(12) == [2, 5, 8, 11]
    assert feature_block_indices(2) == [0, 0, 1, 1]
    assert feature_block_indices(24) == [5, 11, 17, 23]


def test_sincos_pos_embed_distinct_positions():
    for grid in [(4, 4), (3, 4, 5)]:
        pe = sincos_pos_embed(grid, 96)
        assert pe.shape == (int(torch.tensor(grid).prod()), 96)
        assert torch.cdist(pe, pe).fill_diagonal_(1.0).min() > 0.1  # every position is distinguishable


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="no option"):
        create_encoder("vit_tiny", dept=2)
    with pytest.raises(ConfigError, match="Unknown encoder"):
        create_encoder("vit_gigantic")
    with pytest.raises(ConfigError, match="divisible"):
        create_encoder("vit_tiny", img_size=30, patch_size=8)
    with pytest.raises(ConfigError, match="spatial_dims"):
        create_encoder("convnext_lk_tiny", spatial_dims=4)


def test_cli_models_list_and_info():
    from medfm.cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["models", "list", "vit*"])
    assert res.exit_code == 0, res.output
    assert "vit_tiny" in res.output and "convnext_lk_tiny" not in res.output and "5.4M" in res.output
    res = runner.invoke(app, ["models", "info", "vit_tiny", "--spatial-dims", "3", "--img-size", "32"])
    assert res.exit_code == 0, res.output
    assert "(1, 192, 2, 2, 2)" in res.output and "embed_dim=192" in res.output
    res = runner.invoke(app, ["models", "info", "--help"])
    assert "--spatial-dims" in res.output and "--img-size" in res.output


def test_cpu_bf16_attention_uses_the_explicit_form_and_matches_sdpa():
    """On CPU in bf16 the ViT attention takes two matmuls instead of SDPA (faster there); same result."""
    import torch.nn.functional as F

    from medfm.models.vit import Attention, _explicit_is_faster

    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(3, 17, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
        q, k, v = attn.qkv(x).reshape(3, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
        assert _explicit_is_faster(q)
        ref = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 17, 64))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref.float(), atol=3e-2)
    assert not _explicit_is_faster(q.float())  # fp32 keeps SDPA
