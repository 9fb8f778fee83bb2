"""Segmentation metrics (MONAI): Dice, 95th-percentile Hausdorff distance in mm, surface Dice at a tolerance.

All take integer label maps (B, *spatial) and report per foreground class, averaged over cases where the
class is present in the reference (an absent class makes HD undefined, so those cases are skipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from medfm.errors import ConfigError


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *S) int -> (B, K, *S) float one-hot."""
    oh = torch.nn.functional.one_hot(labels.long().clamp(0, num_classes - 1), num_classes)
    return oh.movedim(-1, 1).float()


def _nanmean(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else float("nan")


def segmentation_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | None = None,
    tolerance_mm: float = 2.0,
    class_names: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Per-class {dice, hd95_mm, surface_dice} (+ "mean" over foreground classes) for label maps (B, *S)."""
    if pred.shape != target.shape:
        raise ConfigError(f"prediction shape {tuple(pred.shape)} != reference shape {tuple(target.shape)}")
    p, t = one_hot(pred, num_classes), one_hot(target, num_classes)
    sp = None if spacing is None else [float(s) for s in spacing]
    dice = compute_dice(p, t, include_background=False, ignore_empty=True)  # (B, K-1), nan where absent
    hd = compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=sp)
    sd = compute_surface_dice(
        p, t, class_thresholds=[tolerance_mm] * (num_classes - 1), include_background=False, spacing=sp
    )
    present = t[:, 1:].flatten(2).sum(-1) > 0  # (B, K-1)
    names = list(class_names) if class_names else [f"class_{k}" for k in range(1, num_classes)]
    out: dict[str, dict[str, float]] = {}
    for k in range(num_classes - 1):
        m = present[:, k]
        out[names[k]] = {
            "dice": _nanmean(dice[m, k]),
            "hd95_mm": _nanmean(hd[m, k]),
            "surface_dice": _nanmean(sd[m, k]),
            "n": int(m.sum()),
        }
    keys = ("dice", "hd95_mm", "surface_dice")
    vals = [v for v in out.values() if v["n"] > 0]
    out["mean"] = {
        k: float(np.mean([v[k] for v in vals if not math.isnan(v[k])] or [float("nan")])) for k in keys
    }
    out["mean"]["n"] = int(pred.shape[0])
    return out


def dice_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Dice of two binary masks (any shape); 1.0 when both are empty."""
    p, t = pred.bool(), target.bool()
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom
