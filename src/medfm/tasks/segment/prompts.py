"""Simulated prompts from masks (boxes with jitter, positive/negative points, error-region corrections) and
the training / evaluation loops of the promptable model.

Any dataset with masks trains a promptable model: each connected component of each label is an object;
its bounding box (jittered by a fraction of its size, like an imprecise annotator) or a few points inside
and outside it are the prompt, and the component is the target.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medfm.errors import InputError
from medfm.tasks.segment.loop import train_steps


def components(mask: torch.Tensor, min_size: int = 4) -> list[torch.Tensor]:
    """Binary masks of the connected components of every foreground label (tiny specks dropped)."""
    out = []
    m = mask.cpu().numpy()
    for lab in np.unique(m):
        if lab == 0:
            continue
        cc, n = ndimage.label(m == lab)
        for k in range(1, n + 1):
            comp = cc == k
            if comp.sum() >= min_size:
                out.append(torch.from_numpy(comp))
    return out


def box_from_mask(
    mask: torch.Tensor, jitter: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(x0, y0, x1, y1) inclusive pixel box of a binary mask; sides moved by up to ``jitter`` x box size."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    box = torch.tensor([xs.min(), ys.min(), xs.max(), ys.max()], dtype=torch.float32)
    if jitter > 0:
        w, h = float(box[2] - box[0] + 1), float(box[3] - box[1] + 1)
        noise = (torch.rand(4, generator=generator) * 2 - 1) * jitter * torch.tensor([w, h, w, h])
        box = box + noise.round()
    hgt, wid = mask.shape
    box[0::2] = box[0::2].clamp(0, wid - 1)
    box[1::2] = box[1::2].clamp(0, hgt - 1)
    return box


def _pick(mask: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    idx = torch.nonzero(mask)
    if len(idx) == 0 or n == 0:
        return torch.zeros(0, 2)
    sel = idx[torch.randint(len(idx), (n,), generator=generator)]
    return sel.flip(-1).float()  # (row, col) -> (x, y)


def sample_points(
    mask: torch.Tensor, n_pos: int = 1, n_neg: int = 0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(points (n, 2) pixel x, y; labels (n,) 1 inside / 0 outside) sampled uniformly from the mask and its
    complement."""
    fg = mask > 0
    pos, neg = _pick(fg, n_pos, generator), _pick(~fg, n_neg, generator)
    labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()
    return torch.cat([pos, neg]), labels


def correction_point(
    pred: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click in the error region, labelled as the reference says (iterative correction, as in SAM)."""
    err = pred.bool() != target.bool()
    if not err.any():
        return _pick(target.bool(), 1, generator), torch.ones(1).long()
    p = _pick(err, 1, generator)
    x, y = p[0].long().tolist()
    return p, torch.tensor([int(target[y, x] > 0)])


def _mask_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, M, H, W) logits vs (B, H, W) target -> (B, M) BCE + soft Dice per candidate mask."""
    t = target[:, None].float().expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean((2, 3))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)
    return bce + dice


def _iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    t = target[:, None].bool()
    inter = (pred & t).flatten(2).sum(-1).float()
    union = (pred | t).flatten(2).sum(-1).float()
    return inter / union.clamp(min=1)


def _episode(masks: torch.Tensor, rng: np.random.Generator, g: torch.Generator, jitter: float):
    """One target component per image + its prompt; the batch shares one prompt kind (fixed token count)."""
    kind = "box" if rng.random() < 0.5 else "points"
    targets, boxes, pts, labs = [], [], [], []
    n_pos, n_neg = int(rng.integers(1, 4)), int(rng.integers(0, 3))
    for m in masks:
        comps = components(m) or [m > 0]
        t = comps[int(rng.integers(len(comps)))]
        targets.append(t)
        if kind == "box" and t.any():
            boxes.append(box_from_mask(t, jitter, g))
        else:
            p, lab = sample_points(t.long(), n_pos, n_neg, g)
            if len(p) < n_pos + n_neg:  # empty target or empty background: pad with background clicks
                extra = n_pos + n_neg - len(p)
                p = torch.cat([p, torch.zeros(extra, 2)])
                lab = torch.cat([lab, -torch.ones(extra).long()])
            pts.append(p)
            labs.append(lab)
    target = torch.stack(targets)
    if kind == "box" and len(boxes) == len(masks):
        return target, None, torch.stack(boxes)
    if not pts:  # fell back for some images only: use points for all
        return _episode(masks, rng, g, jitter)
    if len(pts) != len(masks):
        return _episode(masks, rng, g, jitter)
    return target, (torch.stack(pts), torch.stack(labs)), None


def promptable_loss(
    model, images, target, points, boxes, correction_rounds: int = 0, g: torch.Generator | None = None
) -> torch.Tensor:
    """SAM's recipe: min-over-candidates mask loss + MSE of the predicted IoU; optional corrective clicks."""
    emb = model.embed_image(images)
    logits, iou_pred = model.decode(emb, points=points, boxes=boxes)
    losses = _mask_losses(logits, target)
    loss = losses.min(1).values.mean() + F.mse_loss(iou_pred, _iou(logits.detach() > 0, target))
    for _ in range(correction_rounds):
        with torch.no_grad():
            best = logits.gather(1, iou_pred.argmax(1)[:, None, None, None].expand(-1, 1, *logits.shape[2:]))[
                :, 0
            ]
        clicks = [correction_point(best[i] > 0, target[i], g) for i in range(len(target))]
        cp = torch.stack([c[0] for c in clicks])
        cl = torch.stack([c[1] for c in clicks])
        if points is not None:
            cp, cl = torch.cat([points[0], cp], 1), torch.cat([points[1], cl], 1)
        points = (cp, cl)
        logits, iou_pred = model.decode(emb, points=points, boxes=boxes, multimask_output=False)
        loss = loss + _mask_losses(logits, target).mean()
    return loss


def train_promptable_steps(
    model,
    images: torch.Tensor,
    masks: torch.Tensor,
    steps: int = 200,
    batch_size: int = 8,
    lr: float = 1e-3,
    jitter: float = 0.1,
    correction_rounds: int = 0,
    seed: int = 0,
    encoder_lr_scale: float = 0.1,
    progress: bool = False,
) -> list[float]:
    """Train on (N, C, H, W) images and (N, H, W) label maps with simulated prompts; returns losses."""
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)

    def step_loss() -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(len(images), size=min(batch_size, len(images))))
        target, points, boxes = _episode(masks[idx], rng, g, jitter)
        return promptable_loss(model, images[idx], target, points, boxes, correction_rounds, g)

    return train_steps(model, step_loss, steps, lr, encoder_lr_scale, "promptable", progress)


@torch.no_grad()
def segment_with_prompts(
    model,
    image: torch.Tensor,
    boxes: torch.Tensor | None = None,
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
    out_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(H, W) binary mask of a (C, H, W) image at the model's input size for box / point prompts.

    boxes (n, 4) x0, y0, x1, y1 and points ((k, 2) x, y; (k,) labels) are in that image's pixels; every box
    is one object (the points, if any, apply to each). Per object the candidate with the highest predicted
    IoU is kept; its logits are resized to ``out_size`` (default: the model's grid) and thresholded at 0; the
    objects' masks are united."""
    if boxes is None and points is None:
        raise ValueError("give boxes and/or points")
    n = len(boxes) if boxes is not None else 1
    emb = model.embed_image(image[None]).expand(n, -1, -1, -1)
    pts = None if points is None else (points[0][None].expand(n, -1, -1), points[1][None].expand(n, -1))
    logits, iou = model.decode(emb, points=pts, boxes=boxes)
    best = logits[torch.arange(n), iou.argmax(1)]
    if out_size is not None and tuple(out_size) != tuple(best.shape[-2:]):
        best = F.interpolate(best[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
    return (best > 0).any(0)


def segment_with_boxes(model, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(C, H, W) image and (n, 4) boxes -> (H, W) binary union of the best-scoring mask per box."""
    return segment_with_prompts(model, image, boxes=boxes)


def _placement(h: int, w: int, size: int, mode: str) -> tuple[float, float, int, int, int, int]:
    """Where prepare's 2D resize puts an (h, w) image in its size x size square: (scale y, scale x,
    offset y, offset x, placed height, placed width); offsets are negative for a centre crop."""
    from medfm.data.normalize import _fit_shape

    nh, nw = _fit_shape(h, w, size, mode)
    return (
        nh / h,
        nw / w,
        (size - nh) // 2 if nh <= size else -((nh - size) // 2),
        ((size - nw) // 2 if nw <= size else -((nw - size) // 2)),
        nh,
        nw,
    )


def _to_native(t: torch.Tensor, h: int, w: int, place: tuple, nearest: bool) -> torch.Tensor:
    """(C, S, S) on prepare's square grid -> (C, h, w) on the input's own grid (undo pad / crop, resize)."""
    _, _, oy, ox, nh, nw = place
    size = t.shape[-1]
    canvas = torch.zeros((t.shape[0], nh, nw), dtype=t.dtype)
    ys, xs = slice(max(oy, 0), max(oy, 0) + min(nh, size)), slice(max(ox, 0), max(ox, 0) + min(nw, size))
    cy, cx = slice(max(-oy, 0), max(-oy, 0) + min(nh, size)), slice(max(-ox, 0), max(-ox, 0) + min(nw, size))
    canvas[:, cy, cx] = t[:, ys, xs]
    mode = "nearest" if nearest else "bilinear"
    kw = {} if nearest else {"align_corners": False}
    return F.interpolate(canvas[None].float(), size=(h, w), mode=mode, **kw)[0].to(t.dtype)


def prompt_file(
    model,
    path: str | Path,
    spec: dict,
    boxes: list[list[float]] | None = None,
    points: list[list[float]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (H, W), image (C, H, W)) on the raw file's own grid for prompts in the file's pixels.

    The file is read and preprocessed exactly as ``medfm.data.preprocess.load_input(path, spec)`` does (what
    prepare stores for it), then resized to the model's input size; prompts are mapped through the same
    resize / letterbox, and the mask back onto the input's grid."""
    from medfm.data.preprocess import preprocess_sample, to_tensor
    from medfm.data.refs import read_ref

    sample = read_ref(str(Path(path).expanduser()))
    if sample.array.ndim != 3:
        raise InputError(path, f"promptable segmentation needs a 2D image, got shape {sample.array.shape}")
    img = to_tensor(preprocess_sample(sample, spec))
    h, w = sample.array.shape[1:]
    stored, size = int(img.shape[-1]), int(model.img_size)
    place = _placement(h, w, stored, spec["resize_mode"])
    py, px, oy, ox = place[:4]
    f = size / stored
    x = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)[0]

    def fx(v: float) -> float:
        return (v * px + ox) * f

    def fy(v: float) -> float:
        return (v * py + oy) * f

    bx = torch.tensor([[fx(b[0]), fy(b[1]), fx(b[2]), fy(b[3])] for b in boxes]) if boxes else None
    pts = None
    if points:
        pts = (
            torch.tensor([[fx(p[0]), fy(p[1])] for p in points]),
            torch.tensor([int(p[2]) for p in points]),
        )
    mask = segment_with_prompts(model, x, bx, pts, out_size=(stored, stored))
    return _to_native(mask[None], h, w, place, nearest=True)[0], _to_native(img, h, w, place, nearest=False)


@torch.no_grad()
def evaluate_box_prompts(
    model, images: torch.Tensor, masks: torch.Tensor, jitter: float = 0.0, seed: int = 0
) -> dict[str, float]:
    """Dice of the union of one-box-per-object predictions against the foreground of each reference mask."""
    from medfm.tasks.segment.metrics import dice_score

    model.eval()
    g = torch.Generator().manual_seed(seed)
    dices = []
    for img, m in zip(images, masks):
        comps = components(m)
        if not comps:
            continue
        boxes = torch.stack([box_from_mask(c, jitter, g) for c in comps])
        dices.append(dice_score(segment_with_boxes(model, img, boxes), m > 0))
    return {"dice": float(np.mean(dices)) if dices else float("nan"), "n": len(dices)}
