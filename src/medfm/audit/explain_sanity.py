"""Sanity checks that go beside every saliency map (never maps alone).

- **Cascading model-parameter randomisation** (Adebayo et al. 2018): on a deep copy, re-initialise the head,
  then the encoder's layer groups from the top (output side) down, recomputing the maps after each step. A
  map that explains the *model* must change as its weights are destroyed: the Spearman rank correlation
  between trained and randomised maps has to collapse. A method *passes* when the mean correlation after
  every encoder group is randomised is below ``threshold`` (default 0.5; Adebayo et al. report values near
  0 for gradients and Grad-CAM and high values for Guided Backprop, which fails).
- **Localisation against masks**: the pointing game (Zhang et al. 2016: is the map's maximum inside the
  mask?) and the share of saliency mass inside the mask, each against its chance level — the mask's share
  of the image (a uniformly random point, or a uniform map, scores exactly that).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from medfm.audit.explain import Target, eval_mode, find_encoder, normalise_maps, resolve_target, saliency
from medfm.errors import ConfigError


# ---- randomisation -----------------------------------------------------------------------------------
@dataclass
class RandomisationStep:
    """Maps after randomising everything down to and including ``layer``."""

    layer: str
    spearman: float
    spearman_per_case: list[float]
    ssim: float | None = None


@dataclass
class RandomisationResult:
    method: str
    threshold: float
    steps: list[RandomisationStep] = field(default_factory=list)

    @property
    def final_spearman(self) -> float:
        """Mean rank correlation once the head and all encoder groups are randomised."""
        return self.steps[-1].spearman if self.steps else float("nan")

    @property
    def passed(self) -> bool:
        """True when the correlation collapsed below ``threshold`` (the map depends on the weights)."""
        return bool(self.final_spearman < self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "final_spearman": self.final_spearman,
            "passed": self.passed,
            "steps": [asdict(s) for s in self.steps],
        }


def spearman_per_case(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Spearman rank correlation per case between two map batches [B, *s]. A constant map has no ranking:
    its correlation counts as 0 (it carries none of the trained map's information)."""
    out = []
    for u, v in zip(a.flatten(1).cpu().numpy(), b.flatten(1).cpu().numpy()):
        r = float(spearmanr(u, v).statistic) if u.std() > 0 and v.std() > 0 else 0.0
        out.append(0.0 if math.isnan(r) else r)
    return out


def ssim_per_case(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """SSIM per case between min-max normalised maps (2D or 3D, Gaussian window <= 11 px)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    k = min(11, *a.shape[1:])
    k = k if k % 2 else k - 1
    vals = ssim(
        normalise_maps(a)[:, None].float(),
        normalise_maps(b)[:, None].float(),
        data_range=1.0,
        kernel_size=k,
        reduction="none",
    )
    return [float(v) for v in torch.as_tensor(vals).flatten()]


def randomise_(module: nn.Module) -> None:
    """Re-initialise ``module`` in place: every submodule with ``reset_parameters`` gets its own init (this
    also resets batch-norm statistics); loose parameters (tokens, position embeddings, layer scales) are
    shuffled, which keeps their scale and destroys what was learned."""
    covered: set[int] = set()
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
            covered |= {id(p) for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in covered and p.numel() > 1:
                flat = p.reshape(-1)
                p.copy_(flat[torch.randperm(flat.numel(), device=flat.device)].view_as(p))


def _submodule_name(root: nn.Module, sub: nn.Module) -> str | None:
    return next((n for n, m in root.named_modules() if m is sub), None)


def cascade(model: nn.Module, encoder: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Randomisation order on ``model`` (a copy): the head, then encoder groups from the output side.

    The head is ``model.head`` when present, else every top-level child of the model except the encoder.
    """
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        head_mods = [head]
    else:
        head_mods = [m for m in model.children() if m is not encoder]
    steps: list[tuple[str, list[nn.Module]]] = [("head", head_mods)] if head_mods else []
    groups = list(encoder.layer_groups())
    for i in reversed(range(len(groups))):
        steps.append((f"encoder.{i}", [groups[i]]))
    return steps


def cascading_randomisation(
    model: nn.Module,
    x: torch.Tensor,
    method: str | Callable[..., torch.Tensor],
    target: Target = None,
    *,
    encoder: nn.Module | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    with_ssim: bool = False,
    trained_maps: torch.Tensor | None = None,
    **method_opts: Any,
) -> RandomisationResult:
    """Adebayo et al.'s cascading randomisation test for ``method`` on inputs ``x``.

    The target is fixed to the trained model's class (predicted unless ``target`` is given), so each step
    explains the same class. ``model`` is not modified; ``seed`` makes the re-initialisation reproducible
    without touching the global random state.
    """
    enc = find_encoder(model, encoder)
    enc_name = _submodule_name(model, enc)
    if enc_name is None:
        raise ConfigError("the encoder must be a submodule of the model to randomise it on a copy")
    with eval_mode(model), torch.no_grad():
        t = resolve_target(model(x), target)
    opts = dict(method_opts)
    if encoder is not None:
        opts["encoder"] = encoder
    base = trained_maps if trained_maps is not None else saliency(method, model, x, t, **opts)
    if tuple(base.shape) != (x.shape[0], *x.shape[2:]):
        raise ConfigError(f"trained maps of shape {list(base.shape)} do not match inputs {list(x.shape)}")
    clone = copy.deepcopy(model)
    clone_enc = clone.get_submodule(enc_name) if enc_name else clone
    if encoder is not None:
        opts["encoder"] = clone_enc
    label = method if isinstance(method, str) else getattr(method, "__name__", "custom")
    result = RandomisationResult(method=label, threshold=float(threshold))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, modules in cascade(clone, clone_enc):
            for m in modules:
                randomise_(m)
            maps = saliency(method, clone, x, t, **opts)
            rho = spearman_per_case(base, maps)
            ss = float(np.mean(ssim_per_case(base, maps))) if with_ssim else None
            result.steps.append(RandomisationStep(name, float(np.mean(rho)), rho, ss))
    return result


# ---- localisation ------------------------------------------------------------------------------------
@dataclass
class Localisation:
    """Per-method localisation against masks; cases with empty masks are left out (``n`` counts the rest)."""

    n: int
    pointing_game: float  # share of cases whose map maximum lies inside the mask
    pointing_chance: float  # what a uniformly random point would score (area share of the grown mask)
    mass_in_mask: float  # mean share of saliency mass inside the mask
    area_share: float  # baseline: a uniform map puts exactly the mask's area share inside it
    hits: list[bool] = field(default_factory=list)
    mass_per_case: list[float] = field(default_factory=list)

    @property
    def mass_ratio(self) -> float:
        """Saliency mass inside the mask over its area share (> 1: the map concentrates on the mask)."""
        return self.mass_in_mask / self.area_share if self.area_share > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mass_ratio": self.mass_ratio}


def _masks_like(maps: torch.Tensor, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    m = torch.as_tensor(masks, device=maps.device)
    if m.ndim == maps.ndim + 1 and m.shape[1] == 1:
        m = m[:, 0]
    if tuple(m.shape) != tuple(maps.shape):
        raise ConfigError(f"masks of shape {list(m.shape)} do not match maps of shape {list(maps.shape)}")
    return m > 0.5 if m.is_floating_point() else m.bool()


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask
    pool = F.max_pool2d if mask.ndim == 3 else F.max_pool3d
    return pool(mask[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def pointing_game(maps: torch.Tensor, masks: torch.Tensor | np.ndarray, tolerance: int = 0) -> list[bool]:
    """Per case: is the map's maximum inside the mask grown by ``tolerance`` px (chessboard distance)?
    A constant map points nowhere and misses."""
    m = _dilate(_masks_like(maps, masks), tolerance).flatten(1)
    flat = maps.flatten(1)
    idx = flat.argmax(1)
    hit = m.gather(1, idx[:, None])[:, 0] & (flat.amax(1) > flat.amin(1))
    return [bool(h) for h in hit.cpu()]


def mass_in_mask(maps: torch.Tensor, masks: torch.Tensor | np.ndarray) -> tuple[list[float], list[float]]:
    """Per case: (share of non-negative saliency mass inside the mask, the mask's share of the image)."""
    m = _masks_like(maps, masks).flatten(1).float()
    w = maps.flatten(1).float().clamp_min(0)
    total = w.sum(1)
    share = torch.where(total > 0, (w * m).sum(1) / total.clamp_min(1e-12), torch.zeros_like(total))
    return [float(v) for v in share.cpu()], [float(v) for v in m.mean(1).cpu()]


def localisation(maps: torch.Tensor, masks: torch.Tensor | np.ndarray, tolerance: int = 0) -> Localisation:
    """Pointing game (peak within ``tolerance`` px of the mask) and mass-in-mask (the mask itself), over
    the cases whose mask is not empty."""
    hits = pointing_game(maps, masks, tolerance)
    share, area = mass_in_mask(maps, masks)
    grown = _dilate(_masks_like(maps, masks), tolerance).flatten(1).float().mean(1).tolist()
    keep = [i for i, a in enumerate(area) if a > 0]
    if not keep:
        raise ConfigError("every mask is empty: localisation needs at least one case with a mask")
    return Localisation(
        n=len(keep),
        pointing_game=float(np.mean([hits[i] for i in keep])),
        pointing_chance=float(np.mean([grown[i] for i in keep])),
        mass_in_mask=float(np.mean([share[i] for i in keep])),
        area_share=float(np.mean([area[i] for i in keep])),
        hits=[hits[i] for i in keep],
        mass_per_case=[share[i] for i in keep],
    )
