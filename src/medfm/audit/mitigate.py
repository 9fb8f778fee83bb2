"""Test-time adaptation to a target site, measured before/after and guarded on the source.

- :func:`bn_reestimate`: recompute every BatchNorm layer's running mean/variance on the target images
  (Li et al. 2016, "AdaBN"): a new scanner's intensity and contrast move the activations the source
  statistics normalised. No labels needed.
- :func:`tent_adapt`: TENT (Wang et al. 2021) — minimise the entropy of the predictions on the target,
  updating only the normalisation layers' affine parameters (BatchNorm, LayerNorm, GroupNorm), with
  BatchNorm on batch statistics during the updates.
- :func:`mitigation_report`: adapt, measure AUROC before/after on the target (where it has labels) and on
  held-out source data, and keep the original unless the source AUROC stays within ``max_source_drop``
  (issue 18: "never worse by more than 0.01 AUROC on the source").

Both adaptations work on a deep copy; the classifier passed in is never modified. The adapted model is
used in eval mode with running statistics estimated on the whole target (re-estimated before TENT too),
so a case's prediction does not depend on which other cases share its batch — unlike online TENT.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medfm.audit.blank import binary_target, model_input, probabilities
from medfm.errors import ConfigError, InputError

_BN = nn.modules.batchnorm._BatchNorm
_AFFINE_NORMS = (_BN, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
METHODS = ("bn", "tent")


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers (any dimension) that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine weight and bias of every normalisation layer: what TENT updates."""
    return [p for m in model.modules() if isinstance(m, _AFFINE_NORMS)
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A seeded shuffle split into near-equal batches (no trailing batch of one for BatchNorm to fail on)."""
    if n < 2:
        raise InputError(None, f"test-time adaptation needs at least 2 target images, got {n}")
    return np.array_split(rng.permutation(n), max(1, math.ceil(n / max(2, int(batch_size)))))


def _check_images(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim not in (4, 5):
        raise InputError(None, f"target images of shape {x.shape}: expected (N, C, H, W) or (N, C, D, H, W)")
    return x


def _reestimate_inplace(model: nn.Module, images: np.ndarray, batch_size: int, seed: int) -> None:
    layers = batchnorm_layers(model)
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every target batch weighs the same
        m.train()
    with torch.no_grad():
        for idx in _batches(len(images), batch_size, np.random.default_rng(seed)):
            model(model_input(model, images[np.sort(idx)]))
    for m, mom in zip(layers, momenta, strict=True):
        m.momentum = mom
    model.eval()


def bn_reestimate(clf: nn.Module, target_images: np.ndarray, batch_size: int = 32,
                  seed: int = 0) -> nn.Module:
    """A copy of ``clf`` whose BatchNorm running statistics are those of ``target_images`` (eval mode).

    Encoders without BatchNorm (ViT, ConvNeXt: LayerNorm only) have nothing to re-estimate: the copy is
    returned unchanged, with a warning saying so.
    """
    x = _check_images(target_images)
    model = copy.deepcopy(clf)
    if not batchnorm_layers(model):
        warnings.warn("the encoder has no BatchNorm layers: nothing to re-estimate, model unchanged",
                      stacklevel=2)
        return model.eval()
    _reestimate_inplace(model, x, batch_size, seed)
    return model


def prediction_entropy(logits: torch.Tensor, task: str = "binary") -> torch.Tensor:
    """Per-case entropy (nats) of the prediction: softmax over classes, or the sum of per-label Bernoulli
    entropies for multi-label."""
    if task == "multilabel":
        p = torch.sigmoid(logits)
        return -(p * torch.nn.functional.logsigmoid(logits)
                 + (1 - p) * torch.nn.functional.logsigmoid(-logits)).sum(1)
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1)


def tent_adapt(clf: nn.Module, target_images: np.ndarray, steps: int = 20, lr: float = 1e-3,
               batch_size: int = 32, seed: int = 0) -> nn.Module:
    """A copy of ``clf`` adapted by TENT on ``target_images`` (eval mode).

    BatchNorm statistics are re-estimated on the target first; then ``steps`` Adam steps on the mean
    prediction entropy of seeded target batches update only the normalisation layers' affine parameters,
    BatchNorm normalising each batch with its own statistics (running statistics left as re-estimated).
    """
    x = _check_images(target_images)
    model = copy.deepcopy(clf)
    params = norm_affine_parameters(model)
    if not params:
        warnings.warn("the model has no normalisation layers with affine parameters: TENT has nothing to "
                      "adapt, model unchanged", stacklevel=2)
        return model.eval()
    if batchnorm_layers(model):
        _reestimate_inplace(model, x, batch_size, seed)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    layers = [m for m in model.modules() if isinstance(m, _BN)]
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.momentum = 0.0  # batch statistics in the forward pass; running statistics stay as re-estimated
        m.train()
    task = getattr(model, "task", "multiclass")
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed + 1)
    queue: list[np.ndarray] = []
    for _ in range(int(steps)):
        if not queue:
            queue = _batches(len(x), batch_size, rng)
        idx = np.sort(queue.pop(0))
        loss = prediction_entropy(model(model_input(model, x[idx])), task).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for m, mom in zip(layers, momenta, strict=True):
        m.momentum = mom
    for p in model.parameters():
        p.requires_grad_(flags[id(p)])
    return model.eval()


# ---------------------------------------------------------------- before / after with the source guard


@dataclass
class MitigationResult:
    """``model``: the adapted classifier when accepted, else the original (the same object passed in);
    ``report``: what was measured and why it was accepted or refused (JSON-ready)."""

    model: nn.Module
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.report)


def _split(data: Any, what: str) -> tuple[np.ndarray, np.ndarray | None, Sequence | None]:
    """(images, labels | None, patient ids | None) from an array, (images, y) or (images, y, patient_ids)."""
    if isinstance(data, tuple | list):
        if not 1 <= len(data) <= 3:
            raise InputError(None, f"{what}: expected images, (images, y) or (images, y, patient_ids)")
        parts = list(data) + [None] * (3 - len(data))
        return _check_images(parts[0]), None if parts[1] is None else np.asarray(parts[1]), parts[2]
    return _check_images(data), None, None


def _mean_entropy(p: np.ndarray) -> float:
    q = np.clip(p, 1e-12, 1.0)
    return float(-(p * np.log(q)).sum(1).mean())


def _before_after(y: np.ndarray, p0: np.ndarray, p1: np.ndarray, pids: Sequence | None, positive: int,
                  n_boot: int, seed: int) -> dict | None:
    """Paired AUROC original vs adapted on the labelled cases (None when there are no two classes)."""
    from medfm.audit.shortcut import paired_auroc_change

    known, target = binary_target(y, positive)
    if len(known) != len(p0):
        raise InputError(None, f"{len(known)} labels for {len(p0)} images")
    if len(np.unique(target[known])) < 2:
        return None
    ids = None if pids is None else np.asarray(pids, dtype=object)[known]
    r = paired_auroc_change(target[known], p0[known, positive], p1[known, positive], ids, n_boot=n_boot,
                            seed=seed)
    return {"original": r["original"], "adapted": r["modified"], "difference": r["difference"], "n": r["n"]}


def mitigation_report(clf: nn.Module, source_val: Any, target: Any, method: str = "bn",
                      max_source_drop: float = 0.01, positive: int = 1, batch_size: int = 32,
                      tent_steps: int = 20, tent_lr: float = 1e-3, n_boot: int = 200,
                      seed: int = 0, original: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> MitigationResult:
    """Adapt ``clf`` to ``target`` with ``method`` ("bn" or "tent") and decide whether to keep the result.

    ``source_val``: labelled held-out source data, ``(images, y)`` or ``(images, y, patient_ids)``.
    ``target``: target images, optionally with labels / patient ids the same way. AUROC (of class
    ``positive``) is measured before/after on both, with paired CIs. The adapted model is refused (the
    original kept) when its source AUROC is more than ``max_source_drop`` below the original's, or when the
    target has labels and its AUROC got worse; ``report["reason"]`` says which. ``original``: ``clf``'s
    own probabilities on (source, target) when the caller already has them (``probabilities``' output; one
    target adapted by several methods need not predict them again).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown mitigation method {method!r}; known: {', '.join(METHODS)}")
    xs, ys, ps = _split(source_val, "source_val")
    xt, yt, pt = _split(target, "target")
    if ys is None:
        raise InputError(None, "source_val needs labels: the source guard compares AUROC on it")
    report: dict[str, Any] = {"method": method, "max_source_drop": max_source_drop, "seed": seed,
                              "n_source": int(len(xs)), "n_target": int(len(xt)), "accepted": False}
    if method == "bn" and not batchnorm_layers(clf):
        report.update(applicable=False, reason="the encoder has no BatchNorm layers (nothing to "
                                               "re-estimate); TENT on its LayerNorm parameters may apply")
        return MitigationResult(clf, report)
    if method == "tent" and not norm_affine_parameters(clf):
        report.update(applicable=False, reason="the model has no normalisation layers to adapt")
        return MitigationResult(clf, report)
    report["applicable"] = True
    if method == "bn":
        adapted = bn_reestimate(clf, xt, batch_size=batch_size, seed=seed)
    else:
        adapted = tent_adapt(clf, xt, steps=tent_steps, lr=tent_lr, batch_size=batch_size, seed=seed)
        report["tent"] = {"steps": int(tent_steps), "lr": float(tent_lr), "batch_size": int(batch_size)}

    s0, t0 = original if original is not None else (probabilities(clf, xs, batch_size),
                                                    probabilities(clf, xt, batch_size))
    s1, t1 = probabilities(adapted, xs, batch_size), probabilities(adapted, xt, batch_size)
    report["source"] = _before_after(ys, s0, s1, ps, positive, n_boot, seed)
    report["target"] = None if yt is None else _before_after(yt, t0, t1, pt, positive, n_boot, seed)
    report["target_entropy"] = {"original": _mean_entropy(t0), "adapted": _mean_entropy(t1)}
    src = report["source"]
    if src is None:
        raise InputError(None, "source_val must hold both classes for the source guard")
    drop = src["original"]["value"] - src["adapted"]["value"]
    report["source_drop"] = float(drop)
    tgt = report["target"]
    if drop > max_source_drop:
        report["reason"] = (f"refused: source AUROC fell by {drop:.3f} (from {src['original']['value']:.3f} "
                            f"to {src['adapted']['value']:.3f}), more than the allowed {max_source_drop}")
    elif tgt is not None and tgt["difference"]["value"] < 0:
        report["reason"] = (f"refused: target AUROC got worse ({tgt['original']['value']:.3f} -> "
                            f"{tgt['adapted']['value']:.3f})")
    else:
        report["accepted"] = True
        gain = ("target has no labels: the gain there is not measured, only the source guard" if tgt is None
                else f"target AUROC {tgt['original']['value']:.3f} -> {tgt['adapted']['value']:.3f}")
        report["reason"] = f"accepted: source AUROC within {max_source_drop} (drop {drop:.3f}); {gain}"
    return MitigationResult(adapted if report["accepted"] else clf, report)
