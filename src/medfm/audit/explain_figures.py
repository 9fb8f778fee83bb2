"""Overlay panels for saliency maps: image | image + map per method, one row per case.

2D images are shown whole; 3D volumes at one axial slice (the middle one unless ``slice_index`` is given).
Built on ``matplotlib.figure.Figure`` (no pyplot), so it is safe in servers and threads and leaves no
global figure state behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from medfm.audit.explain import normalise_maps
from medfm.errors import ConfigError


def _slice(arr: torch.Tensor, slice_index: int | None) -> np.ndarray:
    """[*spatial] -> 2D numpy: itself in 2D, the chosen (default: middle) first-axis slice in 3D."""
    if arr.ndim == 2:
        return arr.detach().float().cpu().numpy()
    if arr.ndim != 3:
        raise ConfigError(f"overlay needs 2D or 3D spatial arrays, got shape {list(arr.shape)}")
    i = arr.shape[0] // 2 if slice_index is None else int(slice_index)
    if not 0 <= i < arr.shape[0]:
        raise ConfigError(f"slice_index {i} is outside the volume's {arr.shape[0]} slices")
    return arr[i].detach().float().cpu().numpy()


def overlay_figure(
    images: torch.Tensor,
    maps: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    masks: torch.Tensor | None = None,
    row_titles: Sequence[str] | None = None,
    slice_index: int | None = None,
    alpha: float = 0.5,
    cmap: str = "inferno",
    panel_size: float = 2.2,
) -> Figure:
    """A grid: column 0 the image, then one overlay per method; rows are cases.

    ``images`` [B, C, *spatial] (channel 0 is shown); ``maps`` [B, *spatial] or {method: maps}; optional
    ``masks`` [B, *spatial] drawn as a cyan contour on every panel. Each map is min-max scaled per case, so
    colours compare locations within a panel, not strengths across panels.
    """
    named = {"saliency": maps} if torch.is_tensor(maps) else dict(maps)
    if not named:
        raise ConfigError("overlay needs at least one map")
    if images.ndim not in (4, 5):
        raise ConfigError(f"images must be [B, C, H, W] or [B, C, D, H, W], got {list(images.shape)}")
    b, spatial = images.shape[0], tuple(images.shape[2:])
    for name, m in named.items():
        if tuple(m.shape) != (b, *spatial):
            raise ConfigError(f"map '{name}' has shape {list(m.shape)}, expected {[b, *spatial]}")
    if row_titles is not None and len(row_titles) != b:
        raise ConfigError(f"{len(row_titles)} row titles for {b} cases")
    scaled = {k: normalise_maps(v.detach().float()) for k, v in named.items()}
    ncol = 1 + len(scaled)
    fig = Figure(figsize=(panel_size * ncol, panel_size * b), layout="constrained")
    axes = np.asarray(fig.subplots(b, ncol, squeeze=False))
    for i in range(b):
        img = _slice(images[i, 0], slice_index)
        mask = _slice(masks[i].float(), slice_index) if masks is not None else None
        panels = [("image", None), *scaled.items()]
        for j, (title, m) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray", interpolation="nearest")
            if m is not None:
                ax.imshow(_slice(m[i], slice_index), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
            if mask is not None and mask.max() > mask.min():
                ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
        if row_titles is not None:
            axes[i, 0].set_ylabel(row_titles[i], fontsize=8)
    return fig


def save_overlay(path: str | Path, images: torch.Tensor, maps: torch.Tensor | Mapping[str, torch.Tensor],
                 *, dpi: int = 120, **kwargs: object) -> Path:  # fmt: skip
    """Write ``overlay_figure(images, maps, **kwargs)`` as a PNG (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = overlay_figure(images, maps, **kwargs)  # type: ignore[arg-type]
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
    return path
