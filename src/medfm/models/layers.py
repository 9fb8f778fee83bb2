"""Small building blocks shared by the encoder families (2D and 3D alike)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medfm.errors import ConfigError


def to_tuple(value: int | tuple[int, ...] | list[int], n: int, what: str = "size") -> tuple[int, ...]:
    """An int or a length-n sequence -> an n-tuple of ints (raises ConfigError otherwise)."""
    if isinstance(value, int):
        return (value,) * n
    t = tuple(int(v) for v in value)
    if len(t) != n:
        raise ConfigError(f"{what} {list(t)} has {len(t)} entries, expected {n} for spatial_dims={n}")
    return t


def check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return spatial_dims


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample during training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def drop_path_rates(rate: float, n: int) -> list[float]:
    """Linearly increasing stochastic-depth rates over n blocks (the usual ViT/ConvNeXt schedule)."""
    return [rate * i / max(n - 1, 1) for i in range(n)]


class LayerNormCF(nn.LayerNorm):
    """LayerNorm over the channel axis of a channels-first map (B, C, *spatial)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(1, -1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


def sincos_pos_embed(grid: tuple[int, ...], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos position embedding for a 2D or 3D patch grid, shape (prod(grid), dim).

    Each axis gets an equal, even share of the channels; leftover channels (dim not divisible) stay zero.
    Token order matches ``conv(x).flatten(2)`` (row-major over the grid axes).
    """
    n_axes = len(grid)
    per_axis = (dim // n_axes) // 2 * 2
    if per_axis == 0:
        raise ConfigError(f"embed_dim {dim} too small for a {n_axes}D sin-cos position embedding")
    omega = 1.0 / temperature ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis // 2))
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    parts = []
    for c in coords:
        out = c.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(out), torch.cos(out)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = F.pad(emb, (0, dim - emb.shape[1]))
    return emb.float()


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, ...], new_grid: tuple[int, ...]) -> torch.Tensor:
    """Resample a (1, N, D) grid position embedding to a new grid (bicubic in 2D, trilinear in 3D)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    d = pos.shape[-1]
    if math.prod(old_grid) != pos.shape[1]:
        raise ValueError(
            f"position embedding has {pos.shape[1]} tokens, grid {old_grid} expects {math.prod(old_grid)}"
        )
    x = pos.reshape(1, *old_grid, d).movedim(-1, 1).float()
    mode = "bicubic" if len(old_grid) == 2 else "trilinear"
    x = F.interpolate(x, size=tuple(new_grid), mode=mode, align_corners=False)
    return x.movedim(1, -1).reshape(1, -1, d).to(pos.dtype)


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-layer conv weight (out, c, *k) to ``in_chans`` input channels.

    3 -> 1 sums the RGB filters (a grey image equals R=G=B, so the response is unchanged);
    1 -> 3 repeats the filter divided by 3 (same reasoning backwards); other counts use the same rule.
    """
    c = weight.shape[1]
    if c == in_chans:
        return weight
    summed = weight.sum(dim=1, keepdim=True)
    return (summed / in_chans).repeat(1, in_chans, *([1] * (weight.ndim - 2))) if in_chans > 1 else summed
