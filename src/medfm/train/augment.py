"""Augmentations for grey-scale medical images, 2D (C, H, W) and 3D (C, D, H, W).

Torch-only, one image at a time, so they run inside DataLoader workers. Every random draw comes from an
explicit ``torch.Generator``: the data pipeline seeds one per sample from (run seed, sample position), which
makes a run reproducible and resumable whatever the number of workers.

Deliberately absent: colour jitter and random greyscale (the images are grey), and flips by default
(anatomy is lateralised: a flipped chest X-ray shows the heart on the wrong side).

Three families share the module: single-image views (contrastive, MAE), batch-wise transforms of model inputs
(CLIP, fine-tuning) and mask-aware transforms of an image with its label map (segmentation crops), which
move both together and never interpolate the labels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _coin(g: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=g)) < p


def resize(img: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize a (C, *spatial) image to ``size`` (bilinear/trilinear; antialiased when shrinking in 2D)."""
    if tuple(img.shape[1:]) == tuple(size):
        return img
    mode = "bilinear" if img.ndim == 3 else "trilinear"
    shrink = any(s < o for s, o in zip(size, img.shape[1:]))
    out = F.interpolate(
        img[None], size=size, mode=mode, align_corners=False, antialias=bool(shrink and img.ndim == 3)
    )
    return out[0]


def pad_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the last ``len(size)`` axes of ``x`` (centred) up to ``size``; larger axes are kept."""
    pad: list[int] = []
    for s, t in zip(reversed(x.shape[x.ndim - len(size):]), reversed(size)):
        extra = max(0, t - s)
        pad += [extra // 2, extra - extra // 2]
    return F.pad(x, pad) if any(pad) else x


def random_crop(img: torch.Tensor, size: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A random ``size`` crop; axes smaller than ``size`` are zero-padded (centred) first."""
    img = pad_to(img, size)
    starts = [int(torch.randint(0, s - t + 1, (), generator=g)) for s, t in zip(img.shape[1:], size)]
    sl = tuple(slice(a, a + t) for a, t in zip(starts, size))
    return img[(slice(None), *sl)]


def center_crop(img: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Centre crop (zero-pad where smaller) to ``size``."""
    img = pad_to(img, size)
    starts = [(s - t) // 2 for s, t in zip(img.shape[1:], size)]
    return img[(slice(None), *(slice(a, a + t) for a, t in zip(starts, size)))]


def random_resized_crop(
    img: torch.Tensor,
    size: tuple[int, ...],
    g: torch.Generator,
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Crop a random box covering ``scale`` of the area (volume in 3D), then resize to ``size``.

    The aspect ratio is drawn for the last two (in-plane) axes; in 3D the depth extent follows the area scale.
    """
    spatial = list(img.shape[1:])
    area_frac = _uniform(g, *scale)
    log_r = _uniform(g, math.log(ratio[0]), math.log(ratio[1]))
    r = math.exp(log_r)
    nd = len(spatial)
    side = area_frac ** (1.0 / nd)  # per-axis fraction before aspect distortion
    fracs = [side] * nd
    fracs[-1] = min(1.0, side * math.sqrt(r))
    fracs[-2] = min(1.0, side / math.sqrt(r))
    ext = [max(1, min(s, round(s * f))) for s, f in zip(spatial, fracs)]
    starts = [int(torch.randint(0, s - e + 1, (), generator=g)) for s, e in zip(spatial, ext)]
    crop = img[(slice(None), *(slice(a, a + e) for a, e in zip(starts, ext)))]
    return resize(crop, tuple(size))


def random_flip(img: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Left-right flip (last axis) with probability p."""
    return img.flip(-1) if _coin(g, p) else img


def random_rotate(img: torch.Tensor, g: torch.Generator, max_deg: float = 10.0) -> torch.Tensor:
    """Small in-plane rotation (about the slice axis in 3D), zero outside the field of view."""
    if max_deg <= 0:
        return img
    a = math.radians(_uniform(g, -max_deg, max_deg))
    c, s = math.cos(a), math.sin(a)
    if img.ndim == 3:
        theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=img.dtype)[None]
    else:  # grid coords are (x=W, y=H, z=D): rotate x/y, keep z
        theta = torch.tensor([[c, -s, 0.0, 0.0], [s, c, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=img.dtype)[
            None
        ]
    grid = F.affine_grid(theta, [1, *img.shape], align_corners=False)
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def random_intensity(
    img: torch.Tensor,
    g: torch.Generator,
    brightness: float = 0.1,
    contrast: float = 0.2,
    gamma: tuple[float, float] = (0.7, 1.5),
) -> torch.Tensor:
    """Gamma, contrast and brightness changes of a [0, 1] image (what differs between scanners/protocols)."""
    out = img.clamp(0, 1)
    if gamma[0] != 1 or gamma[1] != 1:
        out = out.pow(math.exp(_uniform(g, math.log(gamma[0]), math.log(gamma[1]))))
    if contrast > 0:
        m = out.mean()
        out = (out - m) * _uniform(g, 1 - contrast, 1 + contrast) + m
    if brightness > 0:
        out = out + _uniform(g, -brightness, brightness)
    return out.clamp(0, 1)


def gaussian_noise(img: torch.Tensor, g: torch.Generator, max_std: float = 0.05) -> torch.Tensor:
    std = _uniform(g, 0.0, max_std)
    return img + std * torch.randn(img.shape, generator=g, dtype=img.dtype)


def gaussian_blur(
    img: torch.Tensor, g: torch.Generator, sigma: tuple[float, float] = (0.1, 1.0)
) -> torch.Tensor:
    """Separable gaussian blur over all spatial axes."""
    s = _uniform(g, *sigma)
    radius = max(1, math.ceil(2 * s))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (x / s) ** 2)
    k = k / k.sum()
    nd = img.ndim - 1
    out = img[None]
    conv = F.conv2d if nd == 2 else F.conv3d
    c = img.shape[0]
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = k.numel()
        w = k.view(1, 1, *shape).repeat(c, 1, *([1] * nd))
        pad = [0] * nd
        pad[axis] = radius
        out = conv(out, w, padding=tuple(pad), groups=c)
    return out[0]


@dataclass
class AugmentConfig:
    """Settings of the contrastive view pipeline (all probabilities in [0, 1])."""

    crop_scale: tuple[float, float] = (0.4, 1.0)
    flip_p: float = 0.0  # off: anatomy is lateralised
    rotate_deg: float = 10.0
    intensity_p: float = 0.8
    brightness: float = 0.1
    contrast: float = 0.2
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_p: float = 0.3
    noise_std: float = 0.05
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)


class ViewAugment:
    """One random view of a [0, 1] image at ``size`` (2D or 3D), for contrastive learning."""

    def __init__(self, size: tuple[int, ...], cfg: AugmentConfig | None = None) -> None:
        self.size = tuple(size)
        self.cfg = cfg or AugmentConfig()

    def __call__(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        c = self.cfg
        out = random_resized_crop(img, self.size, g, scale=c.crop_scale)
        out = random_flip(out, g, c.flip_p)
        out = random_rotate(out, g, c.rotate_deg)
        if _coin(g, c.intensity_p):
            out = random_intensity(out, g, c.brightness, c.contrast, c.gamma)
        if _coin(g, c.blur_p):
            out = gaussian_blur(out, g, c.blur_sigma)
        if _coin(g, c.noise_p):
            out = gaussian_noise(out, g, c.noise_std)
        return out.contiguous()


class MaskedModelingAugment:
    """Light augmentation for MAE: random resized crop (2D) or random crop (3D) to ``size``.

    MAE needs little augmentation (masking is the pretext task); in 3D volumes are much larger than a
    training patch, so a random crop at native resolution is the natural view.
    """

    def __init__(self, size: tuple[int, ...], crop_scale: tuple[float, float] = (0.5, 1.0)) -> None:
        self.size = tuple(size)
        self.crop_scale = crop_scale

    def __call__(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if img.ndim == 4:
            return random_crop(img, self.size, g).contiguous()
        return random_resized_crop(img, self.size, g, scale=self.crop_scale).contiguous()


# ---- batch-wise augmentation of model inputs (CLIP training, supervised fine-tuning) ---------------------
@dataclass(frozen=True)
class BatchAugmentConfig:
    """Label-preserving augmentation of a (B, C, *spatial) batch, one random transform per image.

    Steps, in order, each off at its default: ``shift`` rolls the batch by up to that fraction of every axis;
    ``scale`` (area) / ``ratio`` / ``rotate`` (degrees) / ``hflip`` make one random resized crop + rotation
    (+ flip) per image as an affine resample (2D only; 3D batches skip it); ``contrast`` / ``brightness``
    jitter by up to ± that amount. ``centre="half"`` jitters about 0.5 with absolute brightness and clamps to
    [0, 1] (inputs in [0, 1]); ``"mean"`` jitters about each image's mean with brightness in units of the
    batch's standard deviation (normalised inputs). No flips by default: anatomy is lateralised.
    """

    shift: float = 0.0
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotate: float = 0.0
    hflip: bool = False
    contrast: float = 0.0
    brightness: float = 0.0
    centre: str = "mean"

    def __post_init__(self) -> None:
        if self.centre not in ("mean", "half"):
            raise ValueError(f"centre must be 'mean' or 'half', got {self.centre!r}")


def _affine(x: torch.Tensor, g: torch.Generator, cfg: BatchAugmentConfig) -> torch.Tensor:
    """Random resized crop + rotation (+ flip) of each 2D image, border-padded."""
    b = x.shape[0]
    lo, hi = cfg.scale or (1.0, 1.0)
    area = lo + (hi - lo) * torch.rand(b, generator=g)
    r_lo, r_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    ratio = torch.exp(r_lo + (r_hi - r_lo) * torch.rand(b, generator=g))
    # output -> input coordinates: a crop of side sx, sy (fractions of the image) placed inside the image
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (torch.rand(b, generator=g) * 2 - 1) * (1 - sx)
    ty = (torch.rand(b, generator=g) * 2 - 1) * (1 - sy)
    ang = (torch.rand(b, generator=g) * 2 - 1) * math.radians(cfg.rotate)
    flip = torch.ones(b)
    if cfg.hflip:
        flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sx * cos * flip
    theta[:, 0, 1] = -sy * sin
    theta[:, 1, 0] = sx * sin * flip
    theta[:, 1, 1] = sy * cos
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def augment_batch(x: torch.Tensor, g: torch.Generator, cfg: BatchAugmentConfig | None) -> torch.Tensor:
    """Apply ``cfg`` (None: nothing) to a (B, C, H, W) or (B, C, D, H, W) batch, drawing from ``g``."""
    if cfg is None:
        return x
    b, nd = x.shape[0], x.ndim - 2
    if cfg.shift > 0:
        lim = [int(s * cfg.shift) for s in x.shape[2:]]
        shift = [int(torch.randint(-m, m + 1, (1,), generator=g)) for m in lim]
        x = torch.roll(x, shifts=shift, dims=tuple(range(2, 2 + nd)))
    if nd == 2 and (cfg.scale is not None or cfg.rotate > 0 or cfg.hflip):
        x = _affine(x, g, cfg)
    if cfg.contrast > 0 or cfg.brightness > 0:
        shape = (b, *([1] * (nd + 1)))
        c = 1 + (torch.rand(shape, generator=g) - 0.5) * 2 * cfg.contrast
        br = (torch.rand(shape, generator=g) - 0.5) * 2 * cfg.brightness
        if cfg.centre == "half":
            x = ((x - 0.5) * c.to(x) + 0.5 + br.to(x)).clamp(0, 1)
        else:
            mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            x = (x - mean) * c.to(x) + mean + br.to(x) * x.std().clamp(min=1e-3)
    return x


# what CLIP training applies to each batch (inputs in [0, 1]): a small shift and contrast/brightness jitter
CLIP_AUGMENT = BatchAugmentConfig(shift=1 / 16, contrast=0.1, brightness=0.05, centre="half")
# fine-tuning presets: light crop/rotation/jitter; "flip" adds horizontal flips where laterality is free
FINETUNE_PRESETS: dict[str, BatchAugmentConfig | None] = {
    "none": None,
    "light": BatchAugmentConfig(scale=(0.7, 1.0), rotate=10.0, contrast=0.1, brightness=0.1),
    "flip": BatchAugmentConfig(scale=(0.7, 1.0), rotate=10.0, hflip=True, contrast=0.1, brightness=0.1),
}


# ---- mask-aware transforms of an image and its label map (segmentation training crops) -------------------
# Segmentation's crop stream draws from a numpy Generator seeded once per dataset (so its runs reproduce what
# they did before the augmentation stacks were merged); the label map moves with the image, never resampled.
@dataclass(frozen=True)
class PairAugmentConfig:
    """Random crop (``fg_prob`` of them centred on a foreground voxel) of an image + label map, then, with
    ``augment``, a left-right flip of both (``flip``; off for lateralised anatomy) and an intensity jitter
    ``img * U(1 ± contrast) + U(± brightness)`` clamped to [0, 1]."""

    fg_prob: float = 0.5
    augment: bool = True
    flip: bool = True
    contrast: float = 0.1
    brightness: float = 0.05


def crop_pair(
    img: torch.Tensor,
    mask: torch.Tensor,
    size: tuple[int, ...],
    rng: np.random.Generator,
    fg_prob: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``size`` crop of a (C, *S) image and its (*S) label map, zero-padded (centred) where smaller.

    With probability ``fg_prob`` (and any foreground) the crop is centred on a random foreground voxel, so
    small structures are seen often enough."""
    img, mask = pad_to(img, size), pad_to(mask, size)
    spatial = img.shape[1:]
    starts = [int(rng.integers(s - p + 1)) for p, s in zip(size, spatial)]
    if fg_prob and rng.random() < fg_prob and bool(mask.any()):
        fg = torch.nonzero(mask)
        c = fg[int(rng.integers(len(fg)))].tolist()
        starts = [min(max(0, ci - p // 2), s - p) for ci, p, s in zip(c, size, spatial)]
    sl = tuple(slice(a, a + p) for a, p in zip(starts, size))
    return img[(slice(None), *sl)], mask[sl]


def flip_pair(
    img: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator, p: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right flip (last axis) of the image and its label map together, with probability ``p``."""
    if rng.random() < p:
        return img.flip(-1), mask.flip(-1)
    return img, mask


def jitter_intensity(
    img: torch.Tensor, rng: np.random.Generator, contrast: float = 0.1, brightness: float = 0.05
) -> torch.Tensor:
    """``img * U(1 - contrast, 1 + contrast) + U(-brightness, brightness)``, clamped to [0, 1]."""
    scale = float(rng.uniform(1 - contrast, 1 + contrast))
    return (img * scale + float(rng.uniform(-brightness, brightness))).clamp(0, 1)


def augment_pair(
    img: torch.Tensor,
    mask: torch.Tensor,
    size: tuple[int, ...],
    rng: np.random.Generator,
    cfg: PairAugmentConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training crop of an image + label map under ``cfg`` (default PairAugmentConfig()), contiguous."""
    cfg = cfg or PairAugmentConfig()
    img, mask = crop_pair(img, mask, size, rng, cfg.fg_prob)
    if cfg.augment:
        if cfg.flip:
            img, mask = flip_pair(img, mask, rng)
        img = jitter_intensity(img, rng, cfg.contrast, cfg.brightness)
    return img.contiguous(), mask.contiguous()
