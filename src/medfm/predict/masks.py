"""Masks for `medfm predict` with a segmenter (a "segmenter" run or its export): each input is read the way
`medfm segment` reads it, segmented like ``medfm.tasks.segment.infer`` does (whole image or sliding window,
argmax of the logits), and its mask written aligned with the INPUT: 2D masks as PNG at the original H x W
(the resize and the letterbox of the run's preprocessing undone), 3D masks as NIfTI on the volume's own
grid with its affine. Rows get per-class foreground fractions, volumes in mL when the spacing is known,
and the mask file (named by the de-identified case id only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfm.errors import InputError
from medfm.predict.inputs import Case

MASKS = "masks"


@dataclass
class Grid:
    """Where a case's model-grid image came from: the input's own spatial shape and geometry."""

    shape: tuple[int, ...]  # spatial shape of the input (2D: original H, W; 3D: D, H, W)
    spacing: tuple[float, ...]
    spacing_known: bool
    affine: Any = None  # 3D: the input's voxel-to-world affine
    letterbox: tuple[int, int] | None = None  # 2D raw: (nh, nw) the input was resized to before pad / crop


def _fit_shape(h: int, w: int, size: int, mode: str) -> tuple[int, int]:
    """The (nh, nw) ``medfm.data.normalize.resize_2d`` scales an (h, w) image to before padding / cropping."""
    if mode == "stretch":
        return size, size
    scale = size / max(h, w) if mode == "pad" else size / min(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def read_seg_case(case: Case, spec: dict[str, Any], dims: int) -> tuple[torch.Tensor, Grid]:
    """(image (C, *S) float32 at the model's grid, the input's grid) of one case."""
    if case.store is not None:
        from medfm.data.preprocess import to_tensor

        try:
            img = to_tensor(np.asarray(case.store.image_array(case.index)))
        except (ValueError, OSError) as e:
            why = f"case {case.case_id}: stored image unreadable ({type(e).__name__})"
            raise InputError(None, why) from None
        spatial = tuple(int(s) for s in img.shape[1:])
        if len(spatial) == 3:  # prepared volumes lie on the spec's grid (mm)
            sp = tuple(float(s) for s in spec.get("spacing") or (1.0, 1.0, 1.0))
            return img, Grid(spatial, sp, True, np.diag([sp[2], sp[1], sp[0], 1.0]))
        return img, Grid(spatial, (1.0, 1.0), False)
    from medfm.tasks.segment.data import read_image

    spec = dict(spec, modality=case.modality or spec.get("modality"))
    try:
        img, spacing, known, affine, sample = read_image(case.ref, spec)
    except InputError:
        raise
    except (ValueError, OSError, RuntimeError) as e:  # decoders' own errors: one line naming the file
        raise InputError(case.ref, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    src = tuple(int(s) for s in np.asarray(sample.array).shape[1:])
    if len(src) != dims:
        what = "a 2D image" if len(src) == 2 else "a 3D volume"
        raise InputError(case.ref, f"{what}, but the model segments {dims}D inputs")
    if dims == 3:
        if affine is None:
            sz, sy, sx = (float(s) for s in spacing)
            affine = np.diag([sx, sy, sz, 1.0])
        return img, Grid(tuple(int(s) for s in img.shape[1:]), tuple(spacing), known, affine)
    nh, nw = _fit_shape(src[0], src[1], int(spec["size"]), spec["resize_mode"])
    return img, Grid(src, tuple(spacing), known, None, (nh, nw))


def _channels(x: torch.Tensor, c: int) -> torch.Tensor:
    if x.shape[0] == c:
        return x
    if x.shape[0] == 1:
        return x.repeat(c, *[1] * (x.ndim - 1))
    if c == 1:
        return x.mean(0, keepdim=True)
    raise InputError(None, f"image has {x.shape[0]} channels, the model takes {c}")


def segment(model: torch.nn.Module, conf: dict[str, Any], x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Label map of one image on the input's own grid (``conf``: spatial_dims, in_chans, patch, img_size)."""
    from medfm.export.segment import OVERLAP, roi_size
    from medfm.tasks.segment.infer import predict_logits

    x = _channels(x, int(conf["in_chans"]))[None]
    size = conf.get("img_size")
    stored = tuple(x.shape[2:])
    if x.ndim == 4 and size and stored != (int(size), int(size)):  # as load_pairs' resize_pair
        x = F.interpolate(x, size=(int(size),) * 2, mode="bilinear", antialias=True, align_corners=False)
    logits = predict_logits(model, x, roi_size=roi_size(conf), overlap=OVERLAP, out_size=stored)[0]
    if grid.letterbox is not None:  # undo pad / crop, then the resize (on the logits, as infer.py)
        from medfm.data.normalize import crop_or_pad

        logits = torch.from_numpy(crop_or_pad(logits.float().numpy(), grid.letterbox))
        if tuple(logits.shape[1:]) != grid.shape:
            logits = F.interpolate(logits[None], size=grid.shape, mode="bilinear", align_corners=False)[0]
    return logits.argmax(0).to(torch.uint8)


def safe_name(case_id: str) -> str:
    """A case id as a file name (prepared ids may look like paths)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in case_id) or "case"


def write_mask(labels: torch.Tensor, grid: Grid, out: Path, rel: str) -> str:
    """Atomically write the mask (PNG 2D, NIfTI 3D with the input's affine) at ``out/rel``; returns rel."""
    from medfm.tasks.segment.io import write_mask_nifti, write_mask_png

    final = out / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if labels.ndim == 3 else ".png"
    tmp = final.with_name(f".tmp-{final.name[: -len(ext)]}{ext}")
    if labels.ndim == 3:
        write_mask_nifti(labels, tmp, grid.affine)
    else:
        write_mask_png(labels, tmp)
    tmp.replace(final)
    return rel


def columns(labels: torch.Tensor, grid: Grid, classes: list[str], num_classes: int) -> dict[str, float]:
    """Per foreground class: fraction of the input's pixels / voxels, and mL for volumes of known spacing."""
    names = classes if len(classes) == num_classes - 1 else [f"class_{k}" for k in range(1, num_classes)]
    counts = np.bincount(labels.numpy().ravel(), minlength=num_classes)
    n = max(1, int(labels.numel()))
    cols: dict[str, float] = {f"fraction_{names[k - 1]}": round(float(counts[k]) / n, 6)
                              for k in range(1, num_classes)}
    if labels.ndim == 3 and grid.spacing_known:
        voxel_ml = float(np.prod(grid.spacing)) / 1000.0
        cols.update({f"volume_ml_{names[k - 1]}": round(float(counts[k]) * voxel_ml, 4)
                     for k in range(1, num_classes)})
    return cols


def mask_path(case: Case, multi_input: bool, dims: int) -> str:
    """``masks/<case id>.png|.nii.gz`` (``masks/input<k>/...`` when several inputs are predicted)."""
    ext = ".nii.gz" if dims == 3 else ".png"
    sub = f"{MASKS}/input{case.input}" if multi_input else MASKS
    return f"{sub}/{safe_name(case.case_id)}{ext}"
