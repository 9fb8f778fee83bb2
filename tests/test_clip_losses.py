"""CLIP losses against plain per-element reference computations; the batch augmentation stack."""

from __future__ import annotations

import math

import pytest
import torch

from medfm.train.augment import CLIP_AUGMENT, FINETUNE_PRESETS, BatchAugmentConfig, augment_batch
from medfm.train.clip_losses import clip_loss, same_text, sample_hard_negatives


def _reference_infonce(img: torch.Tensor, txt: torch.Tensor, scale: float, pos: torch.Tensor) -> float:
    """Symmetric InfoNCE written out with Python loops: -mean over rows of sum_j target_ij log softmax_ij."""
    b = img.shape[0]
    sim = [[scale * float(img[i] @ txt[j]) for j in range(b)] for i in range(b)]

    def direction(s: list[list[float]], p: list[list[bool]]) -> float:
        tot = 0.0
        for i in range(b):
            lse = math.log(sum(math.exp(v) for v in s[i]))
            k = sum(p[i])
            tot -= sum((s[i][j] - lse) / k for j in range(b) if p[i][j])
        return tot / b

    p = pos.tolist()
    st = [[sim[j][i] for j in range(b)] for i in range(b)]
    pt = [[p[j][i] for j in range(b)] for i in range(b)]
    return 0.5 * (direction(sim, p) + direction(st, pt))


def test_clip_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    eye = torch.eye(6, dtype=torch.bool)
    scale = torch.tensor(14.3, dtype=torch.float64)
    want = _reference_infonce(img, txt, 14.3, eye)
    assert float(clip_loss(img, txt, scale)) == pytest.approx(want, rel=1e-9)
    texts = ["a", "b", "a", "c", "b", "d"]
    pos = same_text(texts)
    assert pos.tolist() == [[texts[i] == texts[j] for j in range(6)] for i in range(6)]
    got = float(clip_loss(img, txt, scale, pos))
    assert got == pytest.approx(_reference_infonce(img, txt, 14.3, pos), rel=1e-9)


def test_hard_negatives_are_never_positives():
    sim = torch.randn(5, 5)
    pos = same_text(["x", "y", "x", "z", "z"])
    for seed in range(20):
        neg = sample_hard_negatives(sim, pos, torch.Generator().manual_seed(seed))
        assert all(not pos[i, int(j)] for i, j in enumerate(neg))
    assert (sample_hard_negatives(sim, torch.ones(5, 5, dtype=torch.bool)) == -1).all()


def test_clip_augment_is_shift_and_jitter_about_half():
    """CLIP_AUGMENT: one roll of the batch by <= 1/16 per axis, then (x - .5) * c + .5 + b, clamped."""
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    out = augment_batch(x, torch.Generator().manual_seed(7), CLIP_AUGMENT)
    g = torch.Generator().manual_seed(7)  # replay the draws in the documented order
    shift = [int(torch.randint(-2, 3, (1,), generator=g)) for _ in range(2)]
    c = 1 + (torch.rand(3, 1, 1, 1, generator=g) - 0.5) * 0.2
    br = (torch.rand(3, 1, 1, 1, generator=g) - 0.5) * 0.1
    ref = ((torch.roll(x, shift, (2, 3)) - 0.5) * c + 0.5 + br).clamp(0, 1)
    torch.testing.assert_close(out, ref)
    assert augment_batch(x, torch.Generator(), None) is x
    vol = augment_batch(torch.rand(2, 1, 8, 16, 16), torch.Generator().manual_seed(0), CLIP_AUGMENT)
    assert vol.shape == (2, 1, 8, 16, 16) and 0 <= float(vol.min()) and float(vol.max()) <= 1


def test_finetune_presets_crop_rotate_and_flip():
    x = torch.zeros(4, 1, 16, 16)
    x[..., :8] = 1.0  # left half bright
    flip_only = BatchAugmentConfig(hflip=True)
    outs = [augment_batch(x, torch.Generator().manual_seed(s), flip_only) for s in range(8)]
    flipped = [bool(o[i, 0, 8, 12] > 0.5) for o in outs for i in range(4)]
    assert any(flipped) and not all(flipped)  # each image flipped with probability 1/2
    light = augment_batch(x, torch.Generator().manual_seed(0), FINETUNE_PRESETS["light"])
    assert light.shape == x.shape and not torch.equal(light, x)
    assert FINETUNE_PRESETS["none"] is None and not FINETUNE_PRESETS["light"].hflip
    with pytest.raises(ValueError, match="centre"):
        BatchAugmentConfig(centre="median")
