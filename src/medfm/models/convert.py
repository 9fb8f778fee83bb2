"""Converters from external checkpoint layouts (timm, Hugging Face ViT / DINOv2) to medfm encoders.

Each converter renames keys into medfm's layout and infers the architecture from tensor shapes; the
number of attention heads is not visible in the weights, so it comes from ``arch=`` / ``num_heads=`` or the
standard head width of 64. Loading then goes through :func:`medfm.models.io.load_state_into`, which adapts
input channels (3 -> 1 sums the RGB filters) and interpolates position embeddings to the requested size.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from medfm.errors import ConfigError, InputError
from medfm.models.base import Encoder
from medfm.models.registry import create_encoder

_HEADS_BY_SIZE = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 24}
_VIT_NAME_BY_DIM = {192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large"}
_HF_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes added by DDP / classification heads (module., vit., dinov2., backbone.)."""
    for prefix in ("module.", "vit.", "dinov2.", "backbone.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _vit_config(out: dict, dim: int, depth: int, patch: int, side: int, in_chans: int, arch, overrides: dict,
                norm_eps: float) -> dict:
    """medfm ViT config for converted weights (already in medfm key layout), read off the tensor shapes."""
    return dict(
        name=_VIT_NAME_BY_DIM.get(dim, "vit_base"),
        spatial_dims=2,
        in_chans=in_chans,
        img_size=side * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=_num_heads(dim, arch, overrides),
        mlp_ratio=out["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in out,
        pos_embed="learned",
        layer_scale=1.0 if "blocks.0.ls1.gamma" in out else None,
        num_register_tokens=out["reg_tokens"].shape[1] if "reg_tokens" in out else 0,
        norm_eps=norm_eps,
    )


def _num_heads(dim: int, arch: str | None, overrides: dict[str, Any]) -> int:
    if "num_heads" in overrides:
        return int(overrides.pop("num_heads"))
    if arch:
        for size, heads in _HEADS_BY_SIZE.items():
            if size in arch:
                return heads
    return max(dim // 64, 1)


def _grid_side(n_tokens: int) -> int:
    side = round(n_tokens**0.5)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} position tokens do not form a square grid")
    return side


def _build(
    path: Path,
    cfg: dict[str, Any],
    sd: dict[str, torch.Tensor],
    overrides: dict[str, Any],
    src_grid: tuple[int, ...],
) -> Encoder:
    from medfm.models.io import load_state_into

    name = cfg.pop("name")
    try:
        enc = create_encoder(name, **{**cfg, **overrides})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return load_state_into(enc, sd, path, src_grid)


# ---- timm ViT --------------------------------------------------------------------------------------------
def timm_vit_to_medfm(
    sd: dict[str, torch.Tensor], arch: str | None, overrides: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], tuple[int, ...]]:
    """timm VisionTransformer state dict -> (medfm config, medfm state dict, source patch grid)."""
    w = sd["patch_embed.proj.weight"]
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    pos = sd["pos_embed"]
    # The class token has its own position unless the model was built with no_embed_class (DINOv2-reg).
    n = pos.shape[1]
    has_cls_pos = "cls_token" in sd and round((n - 1) ** 0.5) ** 2 == n - 1
    side = _grid_side(n - 1 if has_cls_pos else n)
    out: dict[str, torch.Tensor] = {"patch_embed.weight": w, "patch_embed.bias": sd["patch_embed.proj.bias"]}
    if "cls_token" in sd:
        out["cls_token"] = sd["cls_token"]
        out["cls_pos"] = pos[:, :1] if has_cls_pos else torch.zeros_like(sd["cls_token"])
    out["pos_embed"] = pos[:, 1:] if has_cls_pos else pos
    if "reg_token" in sd:
        if has_cls_pos:
            raise ValueError("register tokens with position-embedded prefix tokens are not supported")
        out["reg_tokens"] = sd["reg_token"]
    skip = ("patch_embed.proj.", "pos_embed", "cls_token", "reg_token", "head.", "fc_norm.")
    for k, v in sd.items():
        if not k.startswith(skip):
            out[k] = v
    cfg = _vit_config(out, dim, depth, patch, side, in_chans, arch, overrides, norm_eps=1e-6)
    return cfg, out, (side, side)


# ---- Hugging Face ViT / DINOv2 ---------------------------------------------------------------------------
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_HF_RENAMES = {
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_QKV = {
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}


def hf_vit_to_medfm(
    sd: dict[str, torch.Tensor],
    hf_cfg: dict[str, Any] | None,
    arch: str | None,
    overrides: dict[str, Any],
    path: Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], tuple[int, ...]]:
    """HF ViTModel / Dinov2Model weights (legacy or new key names) -> medfm config, state dict, grid."""
    hf_cfg = hf_cfg or {}
    w = sd["embeddings.patch_embeddings.projection.weight"]
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[2]
    pos = sd["embeddings.position_embeddings"]
    side = _grid_side(pos.shape[1] - 1)
    out: dict[str, torch.Tensor] = {
        "patch_embed.weight": w,
        "patch_embed.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "cls_token": sd["embeddings.cls_token"],
        "cls_pos": pos[:, :1],
        "pos_embed": pos[:, 1:],
    }
    if "embeddings.register_tokens" in sd:
        out["reg_tokens"] = sd["embeddings.register_tokens"]
    qkv: dict[tuple[int, str], list[torch.Tensor | None]] = {}
    unknown = []
    for k, v in sd.items():
        if k.startswith("embeddings.") or k.startswith("pooler."):
            continue  # embeddings handled above; mask_token / pooler are not part of the encoder
        if k.startswith("layernorm."):
            out["norm." + k.split(".", 1)[1]] = v
            continue
        m = _HF_LAYER.match(k)
        if not m:
            unknown.append(k)
            continue
        i, rest = m.group(1), m.group(2)
        base, _, kind = rest.rpartition(".")
        if base in _HF_QKV:
            qkv.setdefault((int(i), kind), [None, None, None])[_HF_QKV[base]] = v
            continue
        for old, new in _HF_RENAMES.items():
            if rest.startswith(old + ".") or rest == old:
                rest = new + rest[len(old) :]
                break
        out[f"blocks.{i}.{rest}"] = v
    if unknown:
        raise InputError(path, f"unexpected key(s) in Hugging Face checkpoint: {', '.join(unknown[:5])}")
    for (i, kind), parts in qkv.items():
        if any(p is None for p in parts):
            raise InputError(path, f"layer {i} lacks one of query/key/value {kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    depth = len({k.split(".")[1] for k in out if k.startswith("blocks.")})
    act = hf_cfg.get("hidden_act", "gelu")
    if act != "gelu" or hf_cfg.get("use_swiglu_ffn"):
        raise InputError(
            path,
            f"unsupported Hugging Face MLP (hidden_act={act!r}, "
            f"use_swiglu_ffn={hf_cfg.get('use_swiglu_ffn', False)}); only exact GELU MLPs load",
        )
    if "num_heads" not in overrides and "num_attention_heads" in hf_cfg:
        overrides["num_heads"] = hf_cfg["num_attention_heads"]
    eps_default = 1e-6 if "blocks.0.ls1.gamma" in out else 1e-12
    cfg = _vit_config(out, dim, depth, patch, side, in_chans, arch, overrides,
                      norm_eps=float(hf_cfg.get("layer_norm_eps", eps_default)))
    return cfg, out, (side, side)


def is_hf_dir(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") in _HF_MODEL_TYPES
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_hf_dir(path: Path, **overrides: Any) -> Encoder:
    """A Hugging Face ViT / DINOv2 directory (config.json + model.safetensors or pytorch_model.bin)."""
    from medfm.models.io import read_safetensors, read_torch_checkpoint

    hf_cfg = json.loads((path / "config.json").read_text())
    if (path / "model.safetensors").is_file():
        sd, _ = read_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        sd = read_torch_checkpoint(path / "pytorch_model.bin")
    else:
        raise InputError(
            path,
            "Hugging Face directory has no model.safetensors or pytorch_model.bin "
            "(sharded checkpoints are not supported)",
        )
    sd = _strip_prefixes(sd)
    if "embeddings.patch_embeddings.projection.weight" not in sd:
        raise InputError(path, f"weights do not look like a {hf_cfg.get('model_type')} model")
    arch = overrides.pop("arch", None)
    cfg, msd, grid = hf_vit_to_medfm(sd, hf_cfg, arch, overrides, path)
    return _build(path, cfg, msd, overrides, grid)


# ---- dispatch -------------------------------------------------------------------------------------------
def detect_layout(sd: dict[str, torch.Tensor]) -> str | None:
    """'timm_vit', 'timm_convnext', 'hf_vit' or None for an (already prefix-stripped) state dict."""
    if "patch_embed.proj.weight" in sd and "pos_embed" in sd:
        return "timm_vit"
    if "stem.0.weight" in sd and any(k.startswith("stages.") for k in sd):
        return "timm_convnext"
    if "embeddings.patch_embeddings.projection.weight" in sd:
        return "hf_vit"
    return None


def load_external(
    path: Path, sd: dict[str, torch.Tensor], arch: str | None = None, **overrides: Any
) -> Encoder:
    """Build a medfm encoder from an external state dict found at ``path``."""
    sd = _strip_prefixes(sd)
    layout = detect_layout(sd)
    try:
        if layout == "timm_vit":
            cfg, msd, grid = timm_vit_to_medfm(sd, arch, overrides)
        elif layout == "hf_vit":
            cfg, msd, grid = hf_vit_to_medfm(sd, None, arch, overrides, path)
        elif layout == "timm_convnext":
            from medfm.models.convnext import timm_convnext_to_medfm

            cfg, msd, grid = timm_convnext_to_medfm(sd, overrides)
        else:
            first = ", ".join(list(sd)[:4])
            raise InputError(
                path,
                "unrecognised checkpoint layout (expected medfm, timm ViT/ConvNeXt or "
                f"Hugging Face ViT/DINOv2 keys; found {first}...)",
            )
    except (KeyError, ValueError, IndexError) as e:
        raise InputError(
            path, f"incomplete or inconsistent {layout} checkpoint ({type(e).__name__}: {e})"
        ) from None
    return _build(path, cfg, msd, overrides, grid)
