"""Episodic training and evaluation of the in-context segmenter on multi-class masks.

An episode = one structure (label) + one query image containing it + k reference images containing it
(other images). Training uses some labels; evaluation uses labels never seen in training, with 1 and 5
references, and never updates weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medfm.errors import ConfigError
from medfm.tasks.segment.loop import train_steps
from medfm.tasks.segment.metrics import dice_score
from medfm.train.segmentation import seg_loss


def cases_with(masks: torch.Tensor, label: int) -> list[int]:
    return [i for i in range(len(masks)) if bool((masks[i] == label).any())]


def synthetic_task(
    images: torch.Tensor, masks: torch.Tensor, labels: list[int], k: int, rng: np.random.Generator
) -> tuple[torch.Tensor, ...] | None:
    """A task that is not a training label, so the model must read the references instead of memorising
    structures: either the union of two training labels, or an intensity band of the smoothed image (the same
    quantile band and smoothing in every image of the episode, half the time restricted to one image half)."""
    idx = rng.choice(len(images), size=k + 1, replace=len(images) < k + 1)
    if rng.random() < 0.5 and len(labels) >= 2:
        a, b = rng.choice(labels, size=2, replace=False)
        tm = ((masks[idx] == int(a)) | (masks[idx] == int(b))).long()
    else:
        img = images[idx].mean(1, keepdim=True)
        pool = torch.nn.functional.avg_pool2d if img.ndim == 4 else torch.nn.functional.avg_pool3d
        ks = int(rng.choice([3, 5, 9]))  # smoothing scale varies the blob size of the band
        sm = pool(img, ks, 1, ks // 2)[:, 0]
        lo = float(rng.uniform(0.0, 0.7))
        hi = lo + float(rng.uniform(0.15, 0.3))
        flat = sm.flatten(1)
        qlo, qhi = flat.quantile(lo, dim=1), flat.quantile(min(hi, 1.0), dim=1)
        shape = (-1,) + (1,) * (sm.ndim - 1)
        band = (sm >= qlo.view(shape)) & (sm <= qhi.view(shape))
        if rng.random() < 0.5:
            # the band within one half of the image (same half in every image: roughly aligned anatomy
            # makes this a consistent, organ-like "left dark region" kind of task)
            axis = int(rng.integers(1, sm.ndim))
            half = sm.shape[axis] // 2
            keep = torch.zeros_like(band)
            sl = [slice(None)] * sm.ndim
            sl[axis] = slice(0, half) if rng.random() < 0.5 else slice(half, None)
            keep[tuple(sl)] = True
            band = band & keep
        tm = band.long()
    if not bool(tm[0].any()) or not bool(tm[1:].flatten(1).any(1).all()):
        return None
    return images[idx[0]], tm[0], images[idx[1:]], tm[1:]


def sample_episodes(
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: list[int],
    k: int,
    n: int,
    rng: np.random.Generator,
    task_augment: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """n episodes -> query (n, C, *S), query mask (n, *S) {0,1}, refs (n, k, C, *S), ref masks (n, k, *S).

    ``task_augment`` is the fraction of episodes that use a synthetic task (see ``synthetic_task``)."""
    pools = {c: cases_with(masks, c) for c in labels}
    usable = [c for c in labels if len(pools[c]) >= 2]
    if not usable:
        raise ConfigError(f"no label among {labels} appears in at least 2 images")
    q, qm, r, rm = [], [], [], []
    for _ in range(n):
        if task_augment and rng.random() < task_augment:
            ep = synthetic_task(images, masks, usable, k, rng)
            if ep is not None:
                for lst, v in zip((q, qm, r, rm), ep):
                    lst.append(v)
                continue
        c = usable[int(rng.integers(len(usable)))]
        pool = pools[c]
        qi = pool[int(rng.integers(len(pool)))]
        others = [i for i in pool if i != qi]
        refs = rng.choice(others, size=k, replace=len(others) < k)
        q.append(images[qi])
        qm.append((masks[qi] == c).long())
        r.append(images[refs])
        rm.append((masks[refs] == c).long())
    return torch.stack(q), torch.stack(qm), torch.stack(r), torch.stack(rm)


def train_incontext(
    model,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: list[int],
    steps: int = 300,
    batch_size: int = 4,
    k_max: int = 5,
    lr: float = 1e-3,
    encoder_lr_scale: float = 0.3,
    seed: int = 0,
    task_augment: float = 0.5,
    progress: bool = False,
) -> list[float]:
    """Episodic training with 1..k_max references per episode (``task_augment`` of them synthetic tasks);
    returns the loss curve."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    loss_fn = seg_loss()

    def step_loss() -> torch.Tensor:
        k = int(rng.integers(1, k_max + 1))
        q, qm, r, rm = sample_episodes(images, masks, labels, k, batch_size, rng, task_augment)
        return loss_fn(model(q, r, rm), qm[:, None])

    return train_steps(model, step_loss, steps, lr, encoder_lr_scale, "in-context", progress)


@torch.no_grad()
def evaluate_incontext(
    model,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: list[int],
    k: int,
    ref_images: torch.Tensor | None = None,
    ref_masks: torch.Tensor | None = None,
    seed: int = 0,
    max_queries: int | None = None,
) -> dict[str, float]:
    """Mean Dice per label over query images containing it, each with k references drawn from the reference
    pool (default: the other query images). No weights change."""
    model.eval()
    rng = np.random.default_rng(seed)
    ref_images = images if ref_images is None else ref_images
    ref_masks = masks if ref_masks is None else ref_masks
    same_pool = ref_images is images
    out: dict[str, float] = {}
    for c in labels:
        dices = []
        queries = cases_with(masks, c)[:max_queries]
        pool = cases_with(ref_masks, c)
        for qi in queries:
            cand = [i for i in pool if not (same_pool and i == qi)]
            if not cand:
                continue
            refs = rng.choice(cand, size=k, replace=len(cand) < k)
            task = model.task_embedding(ref_images[refs][None], (ref_masks[refs] == c).long()[None])
            pred = model.segment(images[qi : qi + 1], task).argmax(1)[0]
            dices.append(dice_score(pred, masks[qi] == c))
        out[f"label_{c}"] = float(np.mean(dices)) if dices else float("nan")
    vals = [v for v in out.values() if not math.isnan(v)]
    out["mean"] = float(np.mean(vals)) if vals else float("nan")
    return out
