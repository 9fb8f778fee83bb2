"""Every registered encoder splits its trunk into ordered layer groups that cover each parameter once."""

from __future__ import annotations

import pytest
import torch

from medfm.models import create_encoder, list_encoders

# Tiny overrides so every family builds in milliseconds; options an encoder lacks are dropped.
_SMALL = {"depth": 2, "img_size": 64, "embed_dim": 48, "num_heads": 2}


def _tiny(name: str):
    from medfm.models.registry import encoder_options

    opts = encoder_options(name)
    kw = {k: v for k, v in _SMALL.items() if k in opts}
    if name.startswith(("swin", "hybrid", "convnext", "resnet")):
        kw.pop("embed_dim", None)
        kw.pop("num_heads", None)
    return create_encoder(name, **kw)


@pytest.mark.parametrize("name", list_encoders())
def test_layer_groups_cover_every_parameter_once(name: str) -> None:
    enc = _tiny(name)
    groups = enc.layer_groups()
    assert len(groups) >= 3, name  # at least stem, one stage, last stage/norm
    seen: dict[int, int] = {}
    for i, g in enumerate(groups):
        for p in g.parameters():
            assert id(p) not in seen, f"{name}: a parameter is in groups {seen[id(p)]} and {i}"
            seen[id(p)] = i
    all_params = {id(p) for p in enc.parameters()}
    assert set(seen) == all_params, f"{name}: {len(all_params - set(seen))} parameters in no group"
    # Input -> output order: the stem's first parameter is the one the input meets first.
    first = next(groups[0].parameters())
    assert first.dim() >= 3 or first.shape[:1] == (1,), name


def test_layer_groups_do_not_change_state_dict_keys() -> None:
    enc = create_encoder("vit_tiny", depth=2, img_size=32, patch_size=16)
    keys = list(enc.state_dict())
    enc.layer_groups()
    assert list(enc.state_dict()) == keys


def test_freezing_first_group_stops_its_gradient() -> None:
    enc = create_encoder("vit_tiny", depth=2, img_size=32, patch_size=16)
    stem = enc.layer_groups()[0]
    for p in stem.parameters():
        p.requires_grad_(False)
    enc(torch.randn(2, 1, 32, 32)).sum().backward()
    assert all(p.grad is None for p in stem.parameters())
    assert enc.blocks[0].attn.qkv.weight.grad is not None
