"""Anatomy blanking for shortcut detection: does the model still score with the anatomy gone?

:func:`blank_masked` replaces the masked region (e.g. the lung fields) of each image; :func:`blanked_auroc`
compares the model's AUROC on the original and the blanked images with a paired patient-level bootstrap CI
(:func:`medfm.audit.shortcut.paired_auroc_change`). A model that reads the disease from the lungs falls to
chance; one that still scores well reads something else — a scanner marker, text, the body outline
(DeGrave et al. 2021; Zech et al. 2018).

The fill is computed from the pixels *outside* the (dilated) mask, never from inside: a fill that carries
the masked intensities (the whole-image mean, say) would leak the very signal the test removes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from medfm.errors import InputError

FILLS = ("mean", "zero", "noise")


def _mask_bool(masks: np.ndarray, n: int, spatial: tuple[int, ...],
               labels: Sequence[int] | None) -> np.ndarray:
    """Masks (N, *s) or (N, 1, *s), binary or label maps -> bool (N, *spatial) (nearest resize if needed)."""
    m = np.asarray(masks)
    if m.ndim == len(spatial) + 2 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != len(spatial) + 1 or len(m) != n:
        raise InputError(None, f"masks of shape {m.shape} do not fit {n} images of spatial size {spatial} "
                               "(expected (N, *spatial) or (N, 1, *spatial))")
    keep = m > 0 if labels is None else np.isin(m, np.asarray(list(labels)))
    if keep.shape[1:] != spatial:  # a mask prepared at another resolution: nearest-neighbour resize
        idx = [np.minimum(((np.arange(o) + 0.5) * i / o).astype(int), i - 1)
               for o, i in zip(spatial, keep.shape[1:], strict=True)]
        keep = keep[(slice(None), *np.ix_(*idx))]
    return keep


def _dilate(keep: np.ndarray, dilate: int) -> np.ndarray:
    if dilate <= 0:
        return keep
    from scipy.ndimage import binary_dilation, generate_binary_structure

    # dilate over the spatial axes only, never across cases
    structure = generate_binary_structure(keep.ndim - 1, 1)[None]
    return binary_dilation(keep, structure=structure, iterations=int(dilate))


def blank_masked(images: np.ndarray, masks: np.ndarray, labels: Sequence[int] | None = None,
                 fill: str = "mean", dilate: int = 0, seed: int = 0) -> np.ndarray:
    """``images`` (N, C, H, W) or (N, C, D, H, W), uint8 or float, with the masked anatomy replaced.

    ``masks``: (N, *spatial) or (N, 1, *spatial); binary, or label maps of which ``labels`` (ids) count as
    the anatomy (None: every non-zero id). ``dilate``: grow the mask by this many pixels first, so the
    organ's edge goes too. ``fill``: "mean" (per image and channel, the mean outside the mask), "zero", or
    "noise" (Gaussian with the mean and std outside the mask, seeded); a mask covering the whole image fills
    with 0. Returns a new array, same dtype (uint8 rounded and clipped).
    """
    if fill not in FILLS:
        raise InputError(None, f"unknown fill {fill!r}; known: {', '.join(FILLS)}")
    x = np.asarray(images)
    if x.ndim not in (4, 5):
        raise InputError(None, f"images of shape {x.shape}: expected (N, C, H, W) or (N, C, D, H, W)")
    keep = _dilate(_mask_bool(masks, len(x), tuple(x.shape[2:]), labels), dilate)
    out = x.astype(np.float64)
    rng = np.random.default_rng(seed)
    for i in range(len(x)):
        inside = keep[i]
        if not inside.any():
            continue
        outside = ~inside
        for c in range(x.shape[1]):
            ch = out[i, c]
            if fill == "zero":
                ch[inside] = 0.0
                continue
            rest = ch[outside]
            mu = float(rest.mean()) if rest.size else 0.0
            if fill == "mean":
                ch[inside] = mu
            else:
                sd = float(rest.std()) if rest.size else 0.0
                ch[inside] = rng.normal(mu, sd, size=int(inside.sum()))
    if x.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(x.dtype)


# ---------------------------------------------------------------- scoring


def model_input(clf: nn.Module, batch: np.ndarray) -> torch.Tensor:
    """A Classifier converts uint8 / channels / size itself; any other module gets the same conversion."""
    from medfm.tasks.adapt.classifier import Classifier, device_of
    from medfm.tasks.adapt.features import to_model_input

    t = torch.as_tensor(np.ascontiguousarray(batch))
    if isinstance(clf, Classifier):
        return t
    return to_model_input(t, getattr(clf, "encoder", clf)).to(device_of(clf))


def probabilities(clf: nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities (n, K) float64 of an image array, the model in eval mode (its mode restored).

    Uses ``clf.predict_proba`` when it has one (a :class:`~medfm.tasks.adapt.classifier.Classifier`),
    else the softmax of ``clf(x)``.
    """
    was = clf.training
    clf.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = model_input(clf, images[i:i + batch_size])
            p = clf.predict_proba(x) if hasattr(clf, "predict_proba") else torch.softmax(clf(x).double(), 1)
            out.append(p.double().cpu().numpy())
    clf.train(was)
    return np.concatenate(out) if out else np.zeros((0, 2))


def binary_target(y: Sequence | np.ndarray, positive: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(known-label row mask, y == positive as int) — NaN or negative labels (prepare's -1) are unknown."""
    v = np.asarray(y, dtype=np.float64).reshape(-1)
    known = np.isfinite(v) & (v >= 0)
    return known, (v == positive).astype(int)


def blanked_auroc(clf: nn.Module, images: np.ndarray, masks: np.ndarray, y: Sequence | np.ndarray,
                  labels: Sequence[int] | None = None, fill: str = "mean", dilate: int = 0,
                  patient_ids: Sequence | None = None, positive: int = 1, n_boot: int = 500,
                  alpha: float = 0.05, margin: float = 0.05, batch_size: int = 32, seed: int = 0) -> dict:
    """AUROC on the original vs the anatomy-blanked images (same cases), difference with a paired CI.

    The score is the probability of class ``positive`` (binary: the positive class), the target
    ``y == positive``. Cases without a label or with an empty mask are left out and counted: blanking
    nothing would pull the blanked AUROC towards the original. Returns
    :func:`~medfm.audit.shortcut.paired_auroc_change`'s dict plus the settings, the mean fraction of
    pixels blanked and a one-line ``interpretation``.
    """
    from medfm.audit.shortcut import paired_auroc_change

    x = np.asarray(images)
    if x.ndim not in (4, 5):
        raise InputError(None, f"images of shape {x.shape}: expected (N, C, H, W) or (N, C, D, H, W)")
    keep = _dilate(_mask_bool(masks, len(x), tuple(x.shape[2:]), labels), dilate)
    known, target = binary_target(y, positive)
    if len(known) != len(x):
        raise InputError(None, f"{len(known)} labels for {len(x)} images")
    has_mask = keep.reshape(len(x), -1).any(1)
    use = known & has_mask
    out: dict = {"fill": fill, "dilate": int(dilate), "labels": None if labels is None else list(labels),
                 "n_no_mask": int((known & ~has_mask).sum()), "n_unlabelled": int((~known).sum())}
    if len(np.unique(target[use])) < 2:
        out.update(n=int(use.sum()), still_above_chance=False,
                   interpretation="not computed: the masked cases do not hold both classes")
        return out
    xs = x[use]
    blanked = blank_masked(xs, np.asarray(masks)[use], labels, fill, dilate, seed)
    p0 = probabilities(clf, xs, batch_size)[:, positive]
    p1 = probabilities(clf, blanked, batch_size)[:, positive]
    pids = None if patient_ids is None else np.asarray(patient_ids, dtype=object)[use]
    out.update(paired_auroc_change(target[use], p0, p1, pids, n_boot=n_boot, alpha=alpha, margin=margin,
                                   seed=seed))
    out["mask_fraction"] = float(keep[use].reshape(int(use.sum()), -1).mean())
    if out["original"]["lo"] <= 0.5 + margin:
        out["interpretation"] = "not conclusive: the model is not clearly above chance on the original images"
        return out
    out["interpretation"] = (
        "AUROC stays above chance with the anatomy blanked: the model reads something outside it "
        "(a possible shortcut)" if out["still_above_chance"] else
        "AUROC falls to chance with the anatomy blanked: the model relies on the masked anatomy")
    return out
