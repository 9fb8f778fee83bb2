"""Test-time adaptation (medfm.audit.mitigate): on a tiny BatchNorm CNN that finds a bright square, a target
site with lower contrast defeats the source statistics and BN re-estimation / TENT bring the AUROC back; the
0.01 source guard refuses an adaptation that breaks the source; the classifier passed in never changes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from medfm.audit.blank import probabilities
from medfm.audit.fast import fast_auroc
from medfm.audit.mitigate import (
    MitigationResult,
    batchnorm_layers,
    bn_reestimate,
    mitigation_report,
    norm_affine_parameters,
    prediction_entropy,
    tent_adapt,
)
from medfm.errors import ConfigError, InputError
from medfm.models import create_encoder
from medfm.tasks.adapt.classifier import Classifier


class SquareEncoder(nn.Module):
    """3x3 local mean -> BatchNorm -> ReLU(z - 1.5) -> global mean: the share of pixels brighter than 1.5
    source standard deviations. A darker target site pushes the square under that threshold unless the
    statistics follow the site."""

    embed_dim = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 9)
            self.bn.bias.fill_(-1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


def squares(n: int, seed: int, size: int = 16, side: int = 6, amp: float = 0.7,
            lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Noise images (float32, N x 1 x size x size); odd cases carry a bright square placed in [lo, hi)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.5, (n, 1, size, size)).astype(np.float32)
    y = np.arange(n) % 2
    hi = size if hi is None else hi
    for i in np.flatnonzero(y):
        r, c = rng.integers(lo, hi - side + 1, 2)
        x[i, 0, r:r + side, c:c + side] += amp
    return x, y


def square_classifier(source: np.ndarray | None = None) -> Classifier:
    """The square detector as a binary Classifier, its BatchNorm statistics fitted on ``source``."""
    head = nn.Linear(1, 1)
    with torch.no_grad():
        head.weight.fill_(20.0)
        head.bias.fill_(-1.0)
    clf = Classifier(SquareEncoder(), head, "binary", ["no", "yes"]).eval()
    return bn_reestimate(clf, squares(200, 0)[0] if source is None else source)


def auroc(clf: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return fast_auroc(y, probabilities(clf, x)[:, 1])


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    xs, ys = squares(120, 1)
    xt, yt = squares(120, 2)
    return {"source": (xs, ys), "dark": (xt * 0.3, yt), "bright": (xt * 5.0, yt)}


def test_bn_reestimate_recovers_a_darker_site_and_leaves_the_original(data) -> None:
    clf = square_classifier()
    before = state(clf)
    xt, yt = data["dark"]
    assert auroc(clf, *data["source"]) > 0.95
    assert auroc(clf, xt, yt) < 0.6  # the square falls under the source threshold
    adapted = bn_reestimate(clf, xt, batch_size=16)
    assert isinstance(adapted, Classifier) and adapted is not clf and not adapted.training
    assert auroc(adapted, xt, yt) > 0.95
    assert same(state(clf), before)
    # the running statistics are now the target's: mean and variance of the local means
    h = torch.nn.functional.conv2d(torch.as_tensor(xt), clf.encoder.conv.weight, padding=1)
    assert adapted.encoder.bn.running_mean.item() == pytest.approx(h.mean().item(), abs=1e-4)
    assert adapted.encoder.bn.running_var.item() == pytest.approx(h.var().item(), rel=0.1)


def test_bn_reestimate_is_deterministic_with_a_seed(data) -> None:
    clf = square_classifier()
    xt = data["dark"][0]
    a, b = bn_reestimate(clf, xt, batch_size=16, seed=3), bn_reestimate(clf, xt, batch_size=16, seed=3)
    assert same(state(a), state(b))


def test_tent_recovers_and_updates_only_normalisation_affine(data) -> None:
    clf = square_classifier()
    before = state(clf)
    xt, yt = data["dark"]
    adapted = tent_adapt(clf, xt, steps=5, lr=1e-2, batch_size=32, seed=0)
    assert auroc(adapted, xt, yt) > 0.95
    assert same(state(clf), before)
    assert torch.equal(adapted.encoder.conv.weight, clf.encoder.conv.weight)
    assert torch.equal(adapted.head.weight, clf.head.weight)
    assert not torch.equal(adapted.encoder.bn.weight, clf.encoder.bn.weight)  # entropy moved the affine
    assert all(p.requires_grad for p in adapted.parameters())  # flags restored
    again = tent_adapt(clf, xt, steps=5, lr=1e-2, batch_size=32, seed=0)
    assert same(state(adapted), state(again))


def test_report_accepts_a_gain_that_keeps_the_source(data) -> None:
    clf = square_classifier()
    res = mitigation_report(clf, data["source"], data["dark"], method="bn", n_boot=50)
    assert isinstance(res, MitigationResult)
    r = res.to_dict()
    assert r["accepted"] and r["applicable"] and res.model is not clf
    assert r["target"]["original"]["value"] < 0.6 and r["target"]["adapted"]["value"] > 0.95
    assert r["target"]["difference"]["lo"] > 0.2  # the paired CI of the gain excludes 0
    assert r["source_drop"] <= 0.01
    assert r["target_entropy"]["adapted"] != r["target_entropy"]["original"]


def test_source_guard_refuses_an_adaptation_that_breaks_the_source(data) -> None:
    clf = square_classifier()
    before = state(clf)
    res = mitigation_report(clf, data["source"], data["bright"], method="bn", n_boot=50)
    r = res.report
    assert not r["accepted"] and res.model is clf
    assert r["source_drop"] > 0.01 and "source AUROC fell" in r["reason"]
    assert r["target"]["adapted"]["value"] >= r["target"]["original"]["value"]  # it did help the target
    assert same(state(clf), before)
    # the guard is what refused: allowing any drop accepts the same adaptation
    assert mitigation_report(clf, data["source"], data["bright"], max_source_drop=1.0, n_boot=20).report[
        "accepted"]


def test_unlabelled_target_is_judged_by_the_source_guard_alone() -> None:
    clf = square_classifier()
    xs, ys = squares(60, 5)
    r = mitigation_report(clf, (xs, ys), xs * 0.3, n_boot=10).report
    assert r["source_drop"] <= 0.01 and r["accepted"]
    assert "no labels" in r["reason"] and r["target"] is None


def test_tent_report_and_unlabelled_target(data) -> None:
    clf = square_classifier()
    r = mitigation_report(clf, data["source"], data["dark"][0], method="tent", tent_steps=3, n_boot=20).report
    assert r["accepted"] and r["target"] is None and r["tent"]["steps"] == 3


def test_layernorm_only_encoder() -> None:
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", img_size=16, patch_size=4, depth=1, embed_dim=16, num_heads=2)
    clf = Classifier(enc, nn.Linear(enc.embed_dim, 1), "binary", ["no", "yes"]).eval()
    x, y = squares(16, 0)
    assert not batchnorm_layers(clf) and norm_affine_parameters(clf)
    with pytest.warns(UserWarning, match="no BatchNorm"):
        copy_ = bn_reestimate(clf, x)
    assert same(state(copy_), state(clf))
    res = mitigation_report(clf, (x, y), x, method="bn")
    assert res.model is clf and res.report["applicable"] is False and "BatchNorm" in res.report["reason"]
    before = state(clf)
    adapted = tent_adapt(clf, x, steps=2, lr=1e-2, batch_size=8)
    changed = {k for k, v in state(adapted).items() if not torch.equal(v, before[k])}
    assert changed and all("norm" in k for k in changed)
    assert same(state(clf), before)


def test_resnet_encoder_statistics_follow_the_target() -> None:
    torch.manual_seed(0)
    enc = create_encoder("resnet18", img_size=16, width=8, small_input=True)
    clf = Classifier(enc, nn.Linear(enc.embed_dim, 1), "binary", ["no", "yes"]).eval()
    x = (squares(12, 0)[0] * 60 + 128).clip(0, 255).astype(np.uint8)  # uint8 input, as a store holds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted = bn_reestimate(clf, x, batch_size=6)
    bn0, bn1 = batchnorm_layers(clf)[0], batchnorm_layers(adapted)[0]
    assert torch.equal(bn0.running_mean, torch.zeros_like(bn0.running_mean))  # original untouched
    assert not torch.allclose(bn1.running_mean, bn0.running_mean)
    assert probabilities(adapted, x).shape == (12, 2)


def test_prediction_entropy_matches_reference() -> None:
    z = torch.tensor([[0.0, 2.0], [0.0, -1.0]])
    p = torch.sigmoid(torch.tensor([2.0, -1.0]))
    bern = -(p * p.log() + (1 - p) * (1 - p).log())
    assert torch.allclose(prediction_entropy(z, "binary"), bern, atol=1e-6)
    assert torch.allclose(prediction_entropy(z[:, 1:], "multilabel"), bern, atol=1e-6)
    assert prediction_entropy(torch.zeros(1, 4), "multiclass").item() == pytest.approx(np.log(4))


def test_bad_inputs() -> None:
    clf = square_classifier()
    x, y = squares(8, 0)
    with pytest.raises(ConfigError, match="unknown mitigation method"):
        mitigation_report(clf, (x, y), x, method="dropout")
    with pytest.raises(InputError, match="needs labels"):
        mitigation_report(clf, x, x)
    with pytest.raises(InputError, match="at least 2"):
        bn_reestimate(clf, x[:1])
    with pytest.raises(InputError, match="expected"):
        bn_reestimate(clf, x[:, 0])
