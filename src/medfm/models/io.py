"""Encoder checkpoints: save to / load from safetensors, plus external weights (timm, HF ViT/DINOv2).

A medfm checkpoint is a single ``model.safetensors`` whose header metadata key ``medfm_encoder`` holds the
encoder config as JSON, so the file alone rebuilds the model. Loading never unpickles: ``.pth``/``.bin``
files go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from medfm.errors import ConfigError, InputError
from medfm.models.base import Encoder
from medfm.models.checkpoint import read_safetensors, read_torch_weights, state_dict_from
from medfm.models.layers import adapt_input_channels, resize_pos_embed
from medfm.models.registry import create_encoder

META_KEY = "medfm_encoder"
WEIGHTS_NAME = "model.safetensors"
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _weights_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / WEIGHTS_NAME


def save_encoder(enc: Encoder, path: str | Path) -> Path:
    """Write ``enc`` to ``path`` (a run directory -> path/model.safetensors, or a .safetensors file)."""
    if not enc.config.get("name"):
        raise ConfigError("encoder has no config (build it with medfm.models.create_encoder)")
    out = _weights_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(enc.config), "format": "pt"})
    tmp.replace(out)  # atomic: a reader never sees half a checkpoint
    return out


def read_torch_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A .pth/.bin state dict, loaded without unpickling arbitrary objects."""
    return state_dict_from(read_torch_weights(path), path)


def _guess_grid(n: int, spatial_dims: int) -> tuple[int, ...]:
    side = round(n ** (1 / spatial_dims))
    if side**spatial_dims != n:
        raise ValueError(f"cannot infer a square grid from {n} position tokens")
    return (side,) * spatial_dims


def load_state_into(
    enc: Encoder, sd: dict[str, torch.Tensor], path: str | Path, src_grid: tuple[int, ...] | None = None
) -> Encoder:
    """Load ``sd`` into ``enc`` strictly, adapting input channels and position-embedding grid sizes.

    Any other difference (unknown or missing keys, other shape mismatches) is an InputError naming ``path``.
    """
    target = enc.state_dict()
    unexpected = sorted(set(sd) - set(target))
    missing = sorted(set(target) - set(sd))
    if unexpected:
        raise InputError(
            path,
            f"{len(unexpected)} unexpected key(s) for encoder "
            f"'{enc.config.get('name')}': {', '.join(unexpected[:5])}",
        )
    if missing:
        raise InputError(
            path,
            f"{len(missing)} key(s) missing for encoder '{enc.config.get('name')}': {', '.join(missing[:5])}",
        )
    out: dict[str, torch.Tensor] = {}
    for k, want in target.items():
        v = sd[k]
        if v.shape != want.shape:
            v = _adapt(enc, k, v, want, path, src_grid)
        out[k] = v.to(want.dtype)
    enc.load_state_dict(out, strict=True)
    return enc


def _adapt(
    enc: Encoder,
    key: str,
    v: torch.Tensor,
    want: torch.Tensor,
    path: str | Path,
    src_grid: tuple[int, ...] | None,
) -> torch.Tensor:
    mismatch = f"shape mismatch for '{key}': checkpoint {tuple(v.shape)} vs model {tuple(want.shape)}"
    if (
        v.ndim >= 4
        and v.ndim == want.ndim
        and want.shape[1] == enc.in_chans
        and v.shape[:1] + v.shape[2:] == want.shape[:1] + want.shape[2:]
    ):
        return adapt_input_channels(v, enc.in_chans)
    if key.endswith("pos_embed") and v.ndim == 3 and v.shape[-1] == want.shape[-1]:
        if getattr(enc, "pos_embed_type", "learned") == "sincos":
            return want  # fixed embedding: the new model's own table is the right one
        grid = getattr(enc, "grid", None)
        try:
            old = tuple(src_grid) if src_grid else _guess_grid(v.shape[1], len(grid or ()) or 2)
            if grid is None or math.prod(grid) != want.shape[1]:
                raise ValueError("the model exposes no patch grid")
            return resize_pos_embed(v, old, tuple(grid))
        except ValueError as e:
            raise InputError(path, f"{mismatch} ({e})") from None
    raise InputError(path, mismatch)


def _load_medfm(
    path: Path, sd: dict[str, torch.Tensor], meta: dict[str, str], overrides: dict[str, Any]
) -> Encoder:
    try:
        cfg = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise InputError(path, f"corrupt '{META_KEY}' metadata ({e})") from None
    enc = create_encoder(**{**cfg, **overrides})
    src_grid = None
    if "patch_size" in cfg and "img_size" in cfg:
        sizes = (
            cfg["img_size"]
            if isinstance(cfg["img_size"], list)
            else [cfg["img_size"]] * cfg.get("spatial_dims", 2)
        )
        src_grid = tuple(s // cfg["patch_size"] for s in sizes)
    return load_state_into(enc, sd, path, src_grid)


def load_encoder(path: str | Path, arch: str | None = None, **overrides: Any) -> Encoder:
    """Load an encoder from a run directory, a medfm ``model.safetensors``, or external weights.

    External weights (local files only): timm ViT/ConvNeXt state dicts (.safetensors/.pth/.bin) and
    Hugging Face ViT/DINOv2 directories (config.json + weights). ``arch`` names the architecture where it
    cannot be inferred from the shapes (e.g. ``"vit_small_patch16_224"``); ``overrides`` (``in_chans``,
    ``img_size``, ``global_pool``, ``drop_path_rate``...) adapt the loaded model: input-channel weights and
    position embeddings are converted to fit.
    """
    from medfm.models import convert  # local import: convert depends on this module

    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or directory")
    if p.is_dir():
        weights = p / WEIGHTS_NAME
        if weights.is_file():
            sd, meta = read_safetensors(weights)
            if META_KEY in meta:
                return _load_medfm(weights, sd, meta, overrides)
        if (p / "config.json").is_file() and convert.is_hf_dir(p):
            return convert.load_hf_dir(p, arch=arch, **overrides)
        if weights.is_file():
            return convert.load_external(weights, sd, arch=arch, **overrides)
        raise InputError(
            p,
            f"not a run directory or Hugging Face model directory (no {WEIGHTS_NAME} "
            "or config.json with model_type)",
        )
    if p.suffix in _TORCH_SUFFIXES:
        return convert.load_external(p, read_torch_checkpoint(p), arch=arch, **overrides)
    sd, meta = read_safetensors(p)
    if META_KEY in meta:
        return _load_medfm(p, sd, meta, overrides)
    return convert.load_external(p, sd, arch=arch, **overrides)
