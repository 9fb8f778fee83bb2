"""Saliency maps for medfm classifiers, 2D and 3D: one registry of methods, one map shape.

Every method takes a classifier ``model(x) -> logits [B, K]`` (the encoder is found as ``model.encoder``
unless given) and inputs ``x`` of shape [B, C, H, W] or [B, C, D, H, W], and returns a detached,
non-negative importance map [B, *spatial] at the input's size::

    maps = saliency("gradcam", clf, x)                  # CNNs and hybrids
    maps = saliency("rollout", clf, x)                  # ViTs (and the serial hybrid's transformer)
    maps = saliency("integrated_gradients", clf, x, n_steps=32)

Methods: Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhyay et al. 2018) on the last spatial
feature map; attention rollout (Abnar & Zuidema 2020); integrated gradients (Sundararajan et al. 2017) and
occlusion (Zeiler & Fergus 2014) through captum. Every method accepts ``encoder=`` (used where needed), so
callers can pass the same options to all. Maps alone are not evidence: see ``explain_sanity``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.errors import ConfigError
from medfm.registry import Registry

Target = int | torch.Tensor | None


SALIENCY: Registry[torch.Tensor] = Registry("saliency method")


# ---- shared plumbing ---------------------------------------------------------------------------------
@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (frozen batch-norm statistics, no dropout), restoring its state after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def find_encoder(model: nn.Module, encoder: nn.Module | None = None) -> nn.Module:
    """The encoder to explain: ``encoder`` if given, else ``model.encoder`` (the Classifier interface)."""
    enc = encoder if encoder is not None else getattr(model, "encoder", None)
    if not isinstance(enc, nn.Module):
        raise ConfigError("this saliency method needs the encoder: pass encoder= or give the model .encoder")
    return enc


def check_input(x: torch.Tensor) -> torch.Tensor:
    """A float batch [B, C, *spatial] (2 or 3 spatial dims), or ConfigError. uint8 images become value/255,
    as the classifier would read them, so that gradients can flow to the input."""
    if not torch.is_tensor(x) or x.ndim not in (4, 5):
        shape = list(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ConfigError(f"saliency input must be [B, C, H, W] or [B, C, D, H, W], got {shape}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x if x.is_floating_point() else x.float()


def resolve_target(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """Class index per case: the predicted class when ``target`` is None; an int applies to every case."""
    b = logits.shape[0]
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, device=logits.device).long().flatten()
    t = t.expand(b) if t.numel() == 1 else t
    if t.numel() != b or int(t.min()) < 0 or int(t.max()) >= logits.shape[1]:
        raise ConfigError(f"target must be one class in 0..{logits.shape[1] - 1} per case, got {target}")
    return t


def upsample(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """[B, *s] -> [B, *size] by (bi/tri)linear interpolation (maps are coarser than the image)."""
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(maps[:, None].float(), size=size, mode=mode, align_corners=False)[:, 0]


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Per-case min-max scaling to [0, 1] (a constant map becomes all zeros); for display and SSIM."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)


def _finish(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    # NaNs from a degenerate (e.g. randomised) network become zeros: "no evidence", not a crash downstream.
    out = upsample(maps.detach().float(), size)
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)


# ---- Grad-CAM / Grad-CAM++ ---------------------------------------------------------------------------
def _called_modules(module: nn.Module) -> Iterator[nn.Module]:
    """Modules of a layer group that forward() actually calls (containers built for grouping are not)."""
    if type(module) in (nn.Module, nn.ModuleList):
        for child in module.children():
            yield from _called_modules(child)
    else:
        yield module


def _last_spatial_activation(
    model: nn.Module, x: torch.Tensor, layer: nn.Module | None, encoder: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model once; return (logits, activation [B, C, *s]) of ``layer``, or of the last layer group
    whose output is a spatial map (the last conv stage) when ``layer`` is None."""
    sd = x.ndim - 2
    if layer is None:
        enc = find_encoder(model, encoder)
        if getattr(enc, "family", "cnn") == "vit":
            raise ConfigError("Grad-CAM needs a convolutional feature map; for a ViT use 'rollout'")
        candidates = [m for g in enc.layer_groups() for m in _called_modules(g)]
    else:
        candidates = [layer]
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        if torch.is_tensor(out) and out.ndim == sd + 2 and out.shape[0] == x.shape[0]:
            seen.append(out)

    handles = [m.register_forward_hook(hook) for m in candidates]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ConfigError("no spatial feature map found for Grad-CAM; pass layer= (a conv stage)")
    return logits, seen[-1]


def _cam(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    layer: nn.Module | None,
    encoder: nn.Module | None,
    plus: bool,
) -> torch.Tensor:
    x = check_input(x)
    # The input carries the graph, so frozen encoders (linear probes) still get gradients at the layer.
    x = x.detach().clone().requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        logits, act = _last_spatial_activation(model, x, layer, encoder)
        t = resolve_target(logits, target)
        score = logits.gather(1, t[:, None]).sum()
        (grad,) = torch.autograd.grad(score, act)
    act, grad = act.detach(), grad.detach()
    dims = tuple(range(2, act.ndim))
    if plus:
        # Closed form for an exponential score (the paper's eq. 19): alpha = g^2 / (2 g^2 + sum(A) g^3).
        g2, g3 = grad.pow(2), grad.pow(3)
        denom = 2 * g2 + act.sum(dims, keepdim=True) * g3
        alpha = torch.where(denom != 0, g2 / denom.where(denom != 0, torch.ones_like(denom)), 0.0)
        weights = (alpha * grad.clamp_min(0)).sum(dims, keepdim=True)
    else:
        weights = grad.mean(dims, keepdim=True)
    cam = (weights * act).sum(1).clamp_min(0)
    return _finish(cam, tuple(x.shape[2:]))


@SALIENCY.register("gradcam", help="Grad-CAM on the last spatial feature map (CNNs, hybrids)")
def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    target: Target = None,
    *,
    layer: nn.Module | None = None,
    encoder: nn.Module | None = None,
) -> torch.Tensor:
    """Grad-CAM: ReLU of the activation maps weighted by their spatially averaged gradients."""
    return _cam(model, x, target, layer, encoder, plus=False)


@SALIENCY.register("gradcam++", help="Grad-CAM++ (pixel-weighted gradients) on the last spatial feature map")
def gradcam_pp(
    model: nn.Module,
    x: torch.Tensor,
    target: Target = None,
    *,
    layer: nn.Module | None = None,
    encoder: nn.Module | None = None,
) -> torch.Tensor:
    """Grad-CAM++: like Grad-CAM, with higher-order gradient weights that credit several object parts."""
    return _cam(model, x, target, layer, encoder, plus=True)


# ---- attention rollout -------------------------------------------------------------------------------
def _has_attention(enc: nn.Module) -> bool:
    from medfm.models.vit import Attention

    return hasattr(enc, "patch_size") and any(isinstance(m, Attention) for m in enc.modules())


def _token_grid(enc: nn.Module, size: tuple[int, ...], n_tokens: int) -> tuple[int, ...]:
    """The patch grid behind ``n_tokens``: of the input as given, or of the encoder's own image size when
    the classifier resizes its input (medfm classifiers do)."""
    extra = 1 + int(getattr(enc, "num_register_tokens", 0)) if hasattr(enc, "cls_token") else 0
    own = tuple(getattr(enc, "grid", ()))
    for grid in (tuple(s // int(enc.patch_size) for s in size), own):
        if grid and math.prod(grid) + extra == n_tokens:
            return grid
    raise ConfigError(f"cannot map {n_tokens} attention tokens onto a patch grid for input size {list(size)}")


@SALIENCY.register("rollout", help="Attention rollout through every transformer block (ViT, serial hybrid)")
def attention_rollout(
    model: nn.Module,
    x: torch.Tensor,
    target: Target = None,
    *,
    encoder: nn.Module | None = None,
    head_fusion: str = "mean",
) -> torch.Tensor:
    """Attention rollout: the product of head-fused attention (plus identity for the residual) over blocks,
    read at the token(s) the encoder pools. Class-agnostic: ``target`` is accepted and ignored."""
    from medfm.models.vit import recording_attention

    x = check_input(x)
    enc = find_encoder(model, encoder)
    if not _has_attention(enc):
        raise ConfigError(f"rollout needs medfm transformer blocks; {type(enc).__name__} has none")
    if head_fusion not in ("mean", "max", "min"):
        raise ConfigError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    with eval_mode(model), torch.no_grad(), recording_attention(enc) as attns:
        model(x)
    if not attns:
        raise ConfigError("the model never called its encoder's attention layers")
    n = attns[0].shape[-1]
    eye = torch.eye(n, device=x.device)
    rollout = eye.expand(x.shape[0], n, n)
    for a in attns:
        fused = a.mean(1) if head_fusion == "mean" else getattr(a, head_fusion)(1).values
        fused = 0.5 * fused + 0.5 * eye  # the residual path carries half of each token forward
        rollout = (fused / fused.sum(-1, keepdim=True)) @ rollout
    grid = _token_grid(enc, tuple(x.shape[2:]), n)
    skip = n - math.prod(grid)  # class + register tokens come first
    if skip > 0 and getattr(enc, "global_pool", "token") == "token":
        rel = rollout[:, 0, skip:]
    else:  # mean-pooled encoders: the output is the average of the patch tokens' rows
        rel = rollout[:, skip:, skip:].mean(1)
    return _finish(rel.reshape(x.shape[0], *grid), tuple(x.shape[2:]))


# ---- captum: integrated gradients, occlusion ---------------------------------------------------------
@SALIENCY.register("integrated_gradients", help="Integrated gradients from a constant baseline (captum)")
def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: Target = None,
    *,
    baseline: float = 0.0,
    n_steps: int = 32,
    internal_batch_size: int | None = None,
    encoder: nn.Module | None = None,
) -> torch.Tensor:
    """|IG| summed over channels. The baseline 0 is the mean intensity of a normalised image.
    (``encoder`` is accepted for a uniform signature; IG only needs the model.)"""
    from captum.attr import IntegratedGradients

    x = check_input(x)
    with eval_mode(model):
        with torch.no_grad():
            t = resolve_target(model(x), target)
        attr = IntegratedGradients(model).attribute(
            x.detach(),
            baselines=float(baseline),
            target=t,
            n_steps=int(n_steps),
            internal_batch_size=internal_batch_size,
        )
    return _finish(attr.abs().sum(1), tuple(x.shape[2:]))


@SALIENCY.register("occlusion", help="Occlusion: score change when a sliding window is set to a baseline")
def occlusion(
    model: nn.Module,
    x: torch.Tensor,
    target: Target = None,
    *,
    window: int | tuple[int, ...] | None = None,
    stride: int | tuple[int, ...] | None = None,
    baseline: float = 0.0,
    perturbations_per_eval: int = 16,
    encoder: nn.Module | None = None,
) -> torch.Tensor:
    """|score change| per position, averaged over the windows covering it. Default window: 1/8 of each
    side (at least 1 px), stride: the window (non-overlapping; halve it for smoother maps)."""
    from captum.attr import Occlusion

    x = check_input(x)
    size = tuple(x.shape[2:])
    win = _per_dim(window, size, lambda s: max(1, math.ceil(s / 8)))
    step = _per_dim(stride, size, lambda s: s) if stride is not None else win
    with eval_mode(model):
        with torch.no_grad():
            t = resolve_target(model(x), target)
        attr = Occlusion(model).attribute(
            x.detach(),
            sliding_window_shapes=(x.shape[1], *win),
            strides=(x.shape[1], *step),
            target=t,
            baselines=float(baseline),
            perturbations_per_eval=int(perturbations_per_eval),
        )
    return _finish(attr.abs().sum(1), size)


def _per_dim(
    value: int | tuple[int, ...] | None, size: tuple[int, ...], default: Callable[[int], int]
) -> tuple[int, ...]:
    if value is None:
        return tuple(default(s) for s in size)
    out = (int(value),) * len(size) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != len(size) or min(out) < 1 or any(o > s for o, s in zip(out, size)):
        raise ConfigError(f"occlusion window/stride {list(out)} does not fit input size {list(size)}")
    return out


# ---- public entry points -----------------------------------------------------------------------------
def list_methods() -> list[str]:
    """Registered saliency method names."""
    return SALIENCY.names()


def methods_for(encoder: nn.Module) -> list[str]:
    """The methods that apply to an encoder: Grad-CAM(++) needs conv maps, rollout medfm attention."""
    kinds = ["integrated_gradients", "occlusion"]
    if getattr(encoder, "family", "cnn") != "vit":
        kinds = ["gradcam", "gradcam++", *kinds]
    if _has_attention(encoder):
        kinds = ["rollout", *kinds]
    return kinds


def saliency(
    kind: str | Callable[..., torch.Tensor],
    model: nn.Module,
    x: torch.Tensor,
    target: Target = None,
    **opts: Any,
) -> torch.Tensor:
    """Maps [B, *spatial] of method ``kind`` for the ``target`` class (default: the predicted class).

    ``kind`` is a registered name or any function ``fn(model, x, target, **opts) -> [B, *spatial]``, so a
    home-made method goes through the same sanity checks.
    """
    if callable(kind):
        return kind(model, x, target, **opts)
    try:
        fn = SALIENCY.get(kind)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    known = [p for p in inspect.signature(fn).parameters if p not in ("model", "x", "target")]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ConfigError(
            f"saliency '{kind}' has no option(s) {', '.join(unknown)}; options: {', '.join(known)}"
        )
    return fn(model, x, target, **opts)
