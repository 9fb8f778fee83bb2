"""Augmentations for grey-scale medical images, 2D (C, H, W) and 3D (C, D, H, W).

Torch-only, one image at a time, so they run inside DataLoader workers. Every random draw comes from an
explicit ``torch.Generator``: the data pipeline seeds one per sample from (run seed, sample position), which
makes a run reproducible and resumable whatever the number of workers.

Deliberately absent: colour jitter and random greyscale (the images are grey), and flips by default
(anatomy is lateralised: a flipped chest X-ray shows the heart on the wrong side).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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


def random_crop(img: torch.Tensor, size: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A random ``size`` crop; axes smaller than ``size`` are zero-padded (centred) first."""
    spatial = img.shape[1:]
    pad: list[int] = []
    for s, t in zip(reversed(spatial), reversed(size)):
        extra = max(0, t - s)
        pad += [extra // 2, extra - extra // 2]
    if any(pad):
        img = F.pad(img, pad)
    starts = [int(torch.randint(0, s - t + 1, (), generator=g)) for s, t in zip(img.shape[1:], size)]
    sl = tuple(slice(a, a + t) for a, t in zip(starts, size))
    return img[(slice(None), *sl)]


def center_crop(img: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Centre crop (zero-pad where smaller) to ``size``."""
    spatial = img.shape[1:]
    pad: list[int] = []
    for s, t in zip(reversed(spatial), reversed(size)):
        extra = max(0, t - s)
        pad += [extra // 2, extra - extra // 2]
    if any(pad):
        img = F.pad(img, pad)
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
