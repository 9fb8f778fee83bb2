"""LoRA adaptation with peft: low-rank adapters on the encoder + a trained linear head.

Targets: for ViTs the attention ``qkv``/``proj`` Linear layers; for CNNs the (non-grouped) convolutions
and Linear layers; hybrids get both. The adapter is saved with peft's ``save_pretrained``
(``adapter_model.safetensors`` + ``adapter_config.json``) and can be merged into the weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from medfm.errors import ConfigError
from medfm.tasks.adapt.finetune import Classifier, fit_and_predict, head_outputs
from medfm.tasks.adapt.registry import ADAPTERS

_ATTN_LEAVES = {"qkv", "proj", "q", "k", "v", "query", "key", "value", "out_proj", "q_proj", "k_proj",
                "v_proj", "o_proj"}


def lora_target_modules(encoder: nn.Module, prefix: str = "") -> list[str]:
    """Full module names (with ``prefix``) that get LoRA adapters, chosen by the encoder family."""
    family = getattr(encoder, "family", "cnn")
    attn, conv, lin = [], [], []
    for name, m in encoder.named_modules():
        if not name:
            continue
        parts = name.split(".")
        in_attn = any("attn" in p or "attention" in p for p in parts[:-1])
        if isinstance(m, nn.Linear) and in_attn and parts[-1] in _ATTN_LEAVES:
            attn.append(name)
        elif isinstance(m, nn.Conv2d | nn.Conv3d) and m.groups == 1:
            conv.append(name)
        elif isinstance(m, nn.Linear):
            lin.append(name)
    if family == "vit":
        names = attn or lin  # a ViT without recognisable attention names: adapt all Linear layers
    elif family == "hybrid":
        names = attn + conv
    else:
        names = conv + lin
    if not names:
        raise ConfigError(f"LoRA: found no Linear/Conv layers to adapt in encoder {type(encoder).__name__}")
    return [prefix + n for n in names]


def lora_model(encoder: nn.Module, n_outputs: int, r: int = 8, alpha: int = 16,
               dropout: float = 0.0) -> PeftModel:
    """Classifier(encoder, head) wrapped by peft: only adapters and the head are trainable."""
    base = Classifier(copy.deepcopy(encoder), n_outputs)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=lora_target_modules(base.encoder, prefix="encoder."),
                     modules_to_save=["head"])
    return get_peft_model(base, cfg)


def save_adapter(model: PeftModel, out_dir: str | Path) -> Path:
    """peft's save_pretrained: adapter_model.safetensors + adapter_config.json (the encoder is not copied)."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def load_adapter(encoder: nn.Module, n_outputs: int, adapter_dir: str | Path) -> PeftModel:
    """Rebuild the adapted classifier from the base encoder and a saved adapter folder."""
    base = Classifier(copy.deepcopy(encoder), n_outputs)
    return PeftModel.from_pretrained(base, str(adapter_dir))


def merge(model: PeftModel) -> Classifier:
    """Fold the adapters into the weights (peft merge_and_unload): a plain Classifier, no extra cost."""
    return model.merge_and_unload()


@ADAPTERS.register("lora", help="LoRA (peft) on attention qkv/proj (ViT) or conv/linear (CNN) + head")
def lora(ctx, train_idx: np.ndarray, seed: int) -> dict:
    torch.manual_seed(seed)
    r = ctx.cfg.lora_r
    model = lora_model(ctx.encoder, head_outputs(ctx.task, ctx.n_out), r=r, alpha=2 * r)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n],
               "lr": ctx.cfg.lr_lora},
              {"params": [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n],
               "lr": max(ctx.cfg.lr_lora, ctx.cfg.lr_head)}]
    out = fit_and_predict(ctx, model, [g for g in groups if g["params"]], train_idx, seed,
                          ref_encoder=ctx.encoder)
    if ctx.adapter_dir is not None:
        out["info"]["adapter"] = str(save_adapter(model, ctx.adapter_dir))
    out["info"]["trainable_params"] = int(sum(p.numel() for p in params))
    merged = merge(model)  # a saved classifier holds plain weights (adapters folded in), no peft needed
    out["encoder"], out["head"] = merged.encoder, merged.head
    return out
