"""Contrastive pieces: NT-Xent and its multi-positive form, augmentations, patient pairing, the sampler."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medfm.train import augment as A
from medfm.train.contrastive import multi_positive_nt_xent, nt_xent
from medfm.train.datamodule import PairedViewsDataset, PooledImages, StreamSampler, item_generator
from medfm.train.synthetic import write_synthetic_dataset


def manual_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / (2 * n)


def test_nt_xent_matches_definition() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    assert math.isclose(float(nt_xent(z1, z2, 0.5)), manual_nt_xent(z1, z2, 0.5), rel_tol=1e-5)
    # aligned pairs give a lower loss than random ones
    assert nt_xent(z1, z1 + 0.01 * torch.randn(5, 8), 0.1) < nt_xent(z1, z2, 0.1)


def test_multi_positive_reduces_to_nt_xent_and_counts_group_members() -> None:
    torch.manual_seed(1)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.isclose(
        multi_positive_nt_xent(z1, z2, torch.arange(6), 0.2), nt_xent(z1, z2, 0.2), atol=1e-6
    )
    # by hand for groups [0, 0, 1]: anchor 0 has positives {1, 3, 4} (other same-group items and views)
    g = torch.tensor([0, 0, 1])
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    z = F.normalize(torch.cat([a, b]), dim=1)
    labels = torch.cat([g, g])
    t = 0.3
    total = 0.0
    for i in range(6):
        others = [k for k in range(6) if k != i]
        logden = torch.logsumexp(torch.stack([z[i] @ z[k] / t for k in others]), 0)
        pos = [k for k in others if labels[k] == labels[i]]
        total += float(-sum(z[i] @ z[k] / t - logden for k in pos) / len(pos))
    assert math.isclose(float(multi_positive_nt_xent(a, b, g, t)), total / 6, rel_tol=1e-5)
    # with patient groups, embeddings clustered by patient score better than pairs aligned but scattered
    pid = torch.tensor([0, 0, 1, 1, 2, 2])
    clustered = (torch.randn(3, 4) * 3)[pid]
    scattered = torch.randn(6, 4) * 3
    loss = {
        name: multi_positive_nt_xent(c + 0.1 * torch.randn(6, 4), c + 0.1 * torch.randn(6, 4), pid, 0.1)
        for name, c in (("clustered", clustered), ("scattered", scattered))
    }
    assert loss["clustered"] < loss["scattered"]


@pytest.mark.parametrize("shape,size", [((1, 40, 48), (32, 32)), ((1, 20, 24, 28), (16, 16, 16))])
def test_view_augment_shapes_range_determinism(shape, size) -> None:
    img = torch.rand(shape)
    aug = A.ViewAugment(size)
    v1 = aug(img, item_generator(0, 5))
    assert v1.shape == (1, *size) and torch.isfinite(v1).all()
    assert torch.equal(v1, aug(img, item_generator(0, 5)))  # same seed -> same view
    assert not torch.equal(v1, aug(img, item_generator(0, 6)))
    mm = A.MaskedModelingAugment(size)(img, item_generator(0, 1))
    assert mm.shape == (1, *size)


def test_augment_pieces() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 16, 16)
    assert torch.equal(A.random_flip(img, g, p=1.0), img.flip(-1))
    assert torch.equal(A.random_flip(img, g, p=0.0), img)
    assert A.AugmentConfig().flip_p == 0.0  # lateralised anatomy: no flips unless asked
    blurred = A.gaussian_blur(img, g, (1.0, 1.0))
    assert blurred.std() < img.std() and torch.isclose(blurred.mean(), img.mean(), atol=0.05)
    out = A.random_intensity(img, g)
    assert out.min() >= 0 and out.max() <= 1
    crop = A.random_crop(torch.rand(1, 10, 40, 40), (16, 16, 16), g)  # depth 10 < 16: padded
    assert crop.shape == (1, 16, 16, 16)
    rot = A.random_rotate(torch.ones(1, 16, 16), g, 10.0)
    assert rot[0, 8, 8] > 0.99  # centre stays inside the field of view


def test_patient_pairs_use_other_images_of_the_same_patient(tmp_path) -> None:
    root = write_synthetic_dataset(tmp_path / "ds", n=10, size=16, images_per_patient=3)
    base = PooledImages([root], "train")
    keys = base.group_keys("patient")
    ds = PairedViewsDataset(base, A.ViewAugment((16, 16)), seed=0, positives="patient")
    assert ds.groups.max() + 1 == len(set(keys)) == 4  # 3 + 3 + 3 + 1 images
    for i in range(len(base)):
        j = ds.partner(i, item_generator(0, i))
        if i == 9:  # the only image of its patient: falls back to itself
            assert j == 9
        else:
            assert j != i and keys[j] == keys[i]
    item = ds[(3, 3)]
    assert item["view1"].shape == item["view2"].shape == (1, 16, 16)
    assert item["group"] == ds.groups[3]
    study = PairedViewsDataset(base, A.ViewAugment((16, 16)), seed=0, positives="study")
    assert study.groups[0] == study.groups[1] != study.groups[2]  # synthetic studies: 2 images, then 1
    aug_ds = PairedViewsDataset(base, A.ViewAugment((16, 16)), seed=0, positives="augment")
    assert len(set(aug_ds.groups.tolist())) == len(base)


def test_stream_sampler_ranks_and_resume() -> None:
    n, total = 7, 12
    r0 = list(StreamSampler(n, total, seed=3, rank=0, world=2))
    r1 = list(StreamSampler(n, total, seed=3, rank=1, world=2))
    draws = sorted(d for _, d in r0 + r1)
    assert draws == list(range(2 * total))  # ranks split the stream with no overlap
    first_epoch = [i for i, d in sorted(r0 + r1, key=lambda t: t[1]) if d < n]
    assert sorted(first_epoch) == list(range(n))  # each epoch is a permutation
    s = StreamSampler(n, total, seed=3, rank=0, world=2)
    s.start = 5
    assert list(s) == r0[5:]
