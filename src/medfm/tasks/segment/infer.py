"""Inference for dense segmentation models: MONAI sliding-window over images/volumes larger than the patch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    out_size: Sequence[int] | None = None,
    flip_tta: bool = False,
) -> torch.Tensor:
    """Logits (B, K, *S) for a batch (B, C, *S).

    Windows of ``roi_size`` are blended with Gaussian weights; images smaller than the window are padded
    by MONAI. ``out_size`` resizes the logits (e.g. back to the original grid before taking the argmax).
    ``flip_tta`` averages with the prediction on the left-right mirrored image (test-time augmentation;
    only sensible for models trained with flips, as `segment train` does).
    """
    if flip_tta:
        a = predict_logits(model, image, roi_size, overlap, sw_batch_size, out_size)
        b = predict_logits(model, image.flip(-1), roi_size, overlap, sw_batch_size, out_size).flip(-1)
        return (a + b) / 2
    model.eval()
    spatial = tuple(image.shape[2:])
    if roi_size is None or all(r >= s for r, s in zip(roi_size, spatial)) and tuple(roi_size) == spatial:
        logits = model(image)
    else:
        logits = sliding_window_inference(
            image, list(roi_size), sw_batch_size, model, overlap=overlap, mode="gaussian"
        )
    if out_size is not None and tuple(out_size) != tuple(logits.shape[2:]):
        mode = "bilinear" if logits.ndim == 4 else "trilinear"
        logits = F.interpolate(logits, size=tuple(out_size), mode=mode, align_corners=False)
    return logits


def predict_labels(model: nn.Module, image: torch.Tensor, **kw) -> torch.Tensor:
    """Label map (B, *S) = argmax over classes of ``predict_logits``."""
    return predict_logits(model, image, **kw).argmax(1)


def predict_pairs(
    model: nn.Module,
    pairs,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    native: bool = True,
    keep_components: int | None = None,
    fill_holes: bool = False,
    flip_tta: bool = False,
) -> list[torch.Tensor]:
    """Label maps for every case of a SegPairs, resized back to each case's native grid when ``native``.

    ``keep_components`` (e.g. 2 for lungs) keeps that many largest components per class; ``fill_holes`` fills
    enclosed holes (see medfm.tasks.segment.postprocess). Both off by default.
    """
    from medfm.tasks.segment.postprocess import clean_labels

    out = []
    for i in range(len(pairs)):
        size = tuple(pairs.native_masks[i].shape) if native else None
        x = pairs.images[i : i + 1]
        lab = predict_labels(model, x, roi_size=roi_size, overlap=overlap, out_size=size, flip_tta=flip_tta)[
            0
        ]
        if keep_components is not None or fill_holes:
            lab = clean_labels(lab, keep_components, fill_holes)
        out.append(lab)
    return out


def evaluate_model(
    model: nn.Module,
    pairs,
    num_classes: int,
    roi_size: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    tolerance_mm: float = 2.0,
    keep_components: int | None = None,
    fill_holes: bool = False,
    flip_tta: bool = False,
) -> dict:
    """Dice / HD95 (mm, using each case's spacing) / surface Dice, per class, against native-grid masks
    (optionally after post-processing, see ``predict_pairs``)."""
    from medfm.tasks.segment.metrics import segmentation_metrics

    preds = predict_pairs(
        model, pairs, roi_size, keep_components=keep_components, fill_holes=fill_holes, flip_tta=flip_tta
    )
    per_case = [
        segmentation_metrics(
            p[None], t[None], num_classes, spacing=s, tolerance_mm=tolerance_mm, class_names=class_names
        )
        for p, t, s in zip(preds, pairs.native_masks, pairs.spacing)
    ]
    return aggregate(per_case)


def aggregate(per_case: list[dict]) -> dict:
    """Mean over cases of per-case metric dicts (NaNs, i.e. absent classes, skipped)."""
    import math

    out: dict = {}
    for name in per_case[0]:
        out[name] = {}
        for k in ("dice", "hd95_mm", "surface_dice"):
            vals = [c[name][k] for c in per_case if not math.isnan(c[name][k])]
            out[name][k] = round(sum(vals) / len(vals), 4) if vals else float("nan")
        out[name]["n"] = sum(1 for c in per_case if not math.isnan(c[name]["dice"]))
    return out
