"""Segmentation training crops (train/augment's mask-aware transforms): --no-flip keeps left and right
(lateralised anatomy such as the heart on a chest X-ray); image and label map always move together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfm.tasks.segment.data import CropDataset, SegPairs
from medfm.train.augment import PairAugmentConfig, augment_pair


def _pairs() -> SegPairs:
    img = torch.zeros(1, 1, 8, 8)
    img[..., :, :2] = 1.0  # bright band on the image's left only
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[:, :, :2] = 1
    return SegPairs(img, mask, [mask[0]], [(1.0, 1.0)], ["a"], [], [None])


def test_flip_false_never_mirrors_and_flip_true_does():
    pairs = _pairs()
    no_flip = CropDataset(pairs, (8, 8), augment=True, length=40, flip=False)
    assert all(int(no_flip[i]["mask"][:, :2].sum()) == 16 for i in range(40))
    flip = CropDataset(pairs, (8, 8), augment=True, length=40, flip=True)
    mirrored = sum(int(flip[i]["mask"][:, -2:].sum()) == 16 for i in range(40))
    assert 5 < mirrored < 35  # about half the crops are mirrored
    # image and mask move together
    item = flip[0]
    assert torch.equal(item["image"][0] > 0.5, item["mask"].bool())


def _reference_crop(img, mask, size, rng, fg_prob, flip):
    """The segmentation training crop written out plainly: centred zero-pad, random start (or centred on a
    random foreground voxel), flip of both, then the intensity jitter — in this order of draws."""
    pads = [max(0, p - s) for p, s in zip(size, img.shape[1:])]
    pad = [v for p in reversed(pads) for v in (p // 2, p - p // 2)]
    img, mask = torch.nn.functional.pad(img, pad), torch.nn.functional.pad(mask, pad)
    starts = [int(rng.integers(s - p + 1)) for p, s in zip(size, img.shape[1:])]
    if rng.random() < fg_prob and bool(mask.any()):
        fg = torch.nonzero(mask)
        c = fg[int(rng.integers(len(fg)))].tolist()
        starts = [min(max(0, ci - p // 2), s - p) for ci, p, s in zip(c, size, img.shape[1:])]
    sl = tuple(slice(a, a + p) for a, p in zip(starts, size))
    img, mask = img[(slice(None), *sl)], mask[sl]
    if flip and rng.random() < 0.5:
        img, mask = img.flip(-1), mask.flip(-1)
    img = (img * float(rng.uniform(0.9, 1.1)) + float(rng.uniform(-0.05, 0.05))).clamp(0, 1)
    return img, mask


@pytest.mark.parametrize(
    "shape, size", [((1, 20, 24), (16, 16)), ((1, 10, 12), (16, 8)), ((1, 6, 9, 10), (8, 8, 8))]
)
@pytest.mark.parametrize("flip", [True, False])
def test_augment_pair_matches_the_plain_reference(shape, size, flip):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(shape, generator=g)
    mask = (torch.rand(shape[1:], generator=g) > 0.85).long() * 3
    cfg = PairAugmentConfig(flip=flip)
    for seed in range(6):
        got = augment_pair(img, mask, size, np.random.default_rng(seed), cfg)
        want = _reference_crop(img, mask, size, np.random.default_rng(seed), cfg.fg_prob, flip)
        assert got[0].shape == (1, *size) and got[1].shape == size
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_augment_pair_moves_labels_with_the_image_and_never_resamples_them():
    mask = torch.zeros(12, 12, dtype=torch.long)
    mask[2:5, 1:4], mask[8:11, 6:11] = 1, 2
    img = mask[None].float() / 4  # the image shows the labels, so both must stay aligned
    cfg = PairAugmentConfig(contrast=0.0, brightness=0.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        im, m = augment_pair(img, mask, (8, 8), rng, cfg)
        assert m.dtype == torch.long and set(m.unique().tolist()) <= {0, 1, 2}
        assert torch.equal(im[0] * 4, m.float())
    # fg_prob=1: every crop is centred on a foreground voxel, so it always holds some foreground
    always = PairAugmentConfig(fg_prob=1.0, augment=False)
    assert all(bool(augment_pair(img, mask, (4, 4), rng, always)[1].any()) for _ in range(20))
