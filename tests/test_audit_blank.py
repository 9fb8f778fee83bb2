"""Anatomy blanking (medfm.audit.blank): the fill replaces exactly the (dilated) mask with values taken from
outside it, for 2D and 3D, uint8 and float, binary masks and label maps; a model that reads a square inside
the mask falls to chance when it is blanked, one that reads a marker outside the mask keeps its AUROC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medfm.audit.blank import blank_masked, blanked_auroc, probabilities
from medfm.errors import InputError
from test_audit_mitigate import square_classifier, squares  # tests/ is on sys.path

SIZE, LO, HI = 16, 3, 13  # the "lung field": rows and columns [LO, HI)


def field_masks(n: int, size: int = SIZE) -> np.ndarray:
    m = np.zeros((n, 1, size, size), np.uint8)
    m[:, :, LO:HI, LO:HI] = 1
    return m


class CornerMarker(nn.Module):
    """Reads only the top-left 2x2 corner (outside the field): a site marker. A plain module, not a
    Classifier: blanked_auroc works on anything that gives logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 10 * x[:, 0, :2, :2].mean((1, 2), keepdim=False)[:, None]
        return torch.cat([torch.zeros_like(z), z], dim=1)


def test_fill_mean_replaces_the_mask_with_the_mean_outside() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 8, 8)).astype(np.float32)
    m = np.zeros((3, 8, 8), bool)
    m[:, 2:5, 1:6] = True
    out = blank_masked(x, m)
    assert out.dtype == np.float32 and out.shape == x.shape and not np.shares_memory(out, x)
    for i in range(3):
        for c in range(2):
            assert np.array_equal(out[i, c][~m[i]], x[i, c][~m[i]])
            assert np.allclose(out[i, c][m[i]], x[i, c][~m[i]].mean(), atol=1e-6)


def test_uint8_3d_label_map_dilate_and_zero() -> None:
    x = np.full((2, 1, 6, 8, 8), 200, np.uint8)
    lab = np.zeros((2, 6, 8, 8), np.uint8)
    lab[:, 2:4, 3:5, 3:5] = 2  # the organ
    lab[:, 0, 0, 0] = 5  # another structure, kept
    out = blank_masked(x, lab, labels=[2], fill="zero")
    assert out.dtype == np.uint8
    assert (out[:, 0][lab == 2] == 0).all() and (out[:, 0][lab != 2] == 200).all()
    grown = blank_masked(x, lab, labels=[2], fill="zero", dilate=1)
    zeroed = grown[:, 0] == 0
    assert zeroed.sum() > (lab == 2).sum()
    assert zeroed[0, 1, 3, 3] and zeroed[0, 2, 2, 3] and not zeroed[0, 1, 2, 2]  # face neighbours only
    assert not zeroed[0, 0, 0, 0]


def test_noise_is_seeded_and_follows_the_outside_statistics() -> None:
    rng = np.random.default_rng(1)
    x = (rng.normal(100, 20, (2, 1, 32, 32))).clip(0, 255).astype(np.uint8)
    m = field_masks(2, 32)
    a, b = blank_masked(x, m, fill="noise", seed=4), blank_masked(x, m, fill="noise", seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, blank_masked(x, m, fill="noise", seed=5))
    inside, outside = a[0, 0][m[0, 0] > 0].astype(float), x[0, 0][m[0, 0] == 0].astype(float)
    assert inside.mean() == pytest.approx(outside.mean(), abs=5)
    assert inside.std() == pytest.approx(outside.std(), rel=0.25)


def test_mask_at_another_resolution_and_empty_masks() -> None:
    x = np.ones((2, 1, 8, 8), np.float32)
    small = np.zeros((2, 1, 4, 4), np.uint8)
    small[0, 0, :2, :2] = 1  # the top-left quarter; case 1 has no mask
    out = blank_masked(x, small, fill="zero")
    assert (out[0, 0, :4, :4] == 0).all() and (out[0, 0, 4:, :] == 1).all() and (out[1] == 1).all()


def test_bad_inputs() -> None:
    x = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(InputError, match="unknown fill"):
        blank_masked(x, np.zeros((2, 8, 8)), fill="blur")
    with pytest.raises(InputError, match="do not fit"):
        blank_masked(x, np.zeros((3, 8, 8)))
    with pytest.raises(InputError, match="expected"):
        blank_masked(x[:, 0], np.zeros((2, 8, 8)))
    with pytest.raises(InputError, match="labels for"):
        blanked_auroc(square_classifier(), x, np.ones((2, 8, 8)), [0, 1, 1])


def test_a_model_that_reads_the_anatomy_collapses_when_it_is_blanked() -> None:
    x, y = squares(120, 3, size=SIZE, lo=LO, hi=HI)  # the finding lies in the field
    r = blanked_auroc(square_classifier(), x, field_masks(len(x)), y, n_boot=100)
    assert r["original"]["value"] > 0.95
    assert abs(r["modified"]["value"] - 0.5) < 0.1 and not r["still_above_chance"]
    assert r["difference"]["hi"] < -0.3
    assert "relies on the masked anatomy" in r["interpretation"]
    assert r["mask_fraction"] == pytest.approx((HI - LO) ** 2 / SIZE ** 2)


def test_a_model_that_reads_a_marker_outside_keeps_its_auroc() -> None:
    x, y = squares(120, 4, size=SIZE, lo=LO, hi=HI)
    x[y == 1, :, :2, :2] += 1.0  # the site marker, on the positives only
    r = blanked_auroc(CornerMarker(), x, field_masks(len(x)), y, fill="noise", n_boot=100)
    assert r["original"]["value"] > 0.95 and r["modified"]["value"] > 0.95
    assert r["still_above_chance"] and abs(r["difference"]["value"]) < 0.02
    assert "outside" in r["interpretation"]


def test_unlabelled_and_maskless_cases_are_left_out_and_counted() -> None:
    x, y = squares(40, 5, size=SIZE, lo=LO, hi=HI)
    m = field_masks(len(x))
    m[:5] = 0
    yy = y.astype(float)
    yy[5:8] = np.nan
    r = blanked_auroc(square_classifier(), x, m, yy, patient_ids=[f"p{i // 2}" for i in range(40)], n_boot=20)
    assert r["n_no_mask"] == 5 and r["n_unlabelled"] == 3 and r["n"] == 32
    p = probabilities(square_classifier(), x[:4])
    assert p.shape == (4, 2) and np.allclose(p.sum(1), 1)
