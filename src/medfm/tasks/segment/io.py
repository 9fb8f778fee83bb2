"""Write predicted masks aligned with their inputs (PNG for 2D, NIfTI with the input's affine for 3D) and
overlay PNGs (image + coloured mask contours) for reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
    ],
    dtype=np.uint8,
)


def write_mask_png(labels: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """(H, W) label map -> 8-bit PNG of the label values (0 background)."""
    from PIL import Image

    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def write_mask_nifti(labels: torch.Tensor | np.ndarray, path: str | Path, affine: Any) -> Path:
    """(D, H, W) label map -> NIfTI with the input's affine (so spacing and orientation match the input).

    medfm arrays are (z, y, x); NIfTI data are (x, y, z), hence the transpose back.
    """
    import nibabel as nib

    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.uint8)
    img = nib.Nifti1Image(
        np.ascontiguousarray(arr.transpose(2, 1, 0)), affine if affine is not None else np.eye(4)
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def overlay(
    image: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    reference: torch.Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8: the image (RGB kept in colour, grey otherwise) with each label's contour in its
    colour (reference contours white). ``image`` is (H, W) or channel-first (C, H, W) in [0, 1]."""
    img = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    if img.ndim == 3 and img.shape[0] == 3:
        rgb = np.ascontiguousarray((img.transpose(1, 2, 0) * 255).astype(np.uint8))
    else:
        img = img[0] if img.ndim == 3 else img
        rgb = np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=-1)
    lab = np.asarray(labels)
    if reference is not None:
        ref = np.asarray(reference) > 0
        rgb[ref & ~ndimage.binary_erosion(ref)] = 255
    for k in np.unique(lab):
        if k == 0:
            continue
        m = lab == k
        rgb[m & ~ndimage.binary_erosion(m)] = PALETTE[int(k) % len(PALETTE) or 1]
    return rgb


def write_overlay_png(image, labels, path: str | Path, reference=None) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, labels, reference)).save(path)
    return path


def write_report(
    path: str | Path,
    title: str,
    rows: list[dict[str, Any]],
    overlays: list[Path],
    summary: dict[str, Any] | None = None,
    max_images: int = 24,
) -> Path:
    """Self-contained HTML report: summary, per-case table, overlay thumbnails (medfm.eval.html.Report)."""
    import pandas as pd

    from medfm.eval.html import Report

    r = Report(title, subtitle=f"{len(rows)} cases")
    if summary:
        r.add_kv(summary)
    if rows:
        r.add_heading("Per case")
        r.add_table(pd.DataFrame(rows))
    if overlays:
        r.add_heading("Overlays (prediction in colour, reference contour in white)")
        r.begin_row()
        for p in overlays[:max_images]:
            r.add_image(Path(p).read_bytes(), caption=Path(p).stem, width=256)
        r.end_row()
    return r.save(path)
