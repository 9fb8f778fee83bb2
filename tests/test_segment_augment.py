"""Training crops: --no-flip keeps left and right (lateralised anatomy such as the heart on a chest X-ray)."""

from __future__ import annotations

import torch

from medfm.tasks.segment.data import CropDataset, SegPairs


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
