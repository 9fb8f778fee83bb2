"""``hf_vision``: a Hugging Face vision backbone (Swin, ConvNeXt, ResNet, CLIP / SigLIP vision towers, ...)
as a medfm :class:`Encoder`, built by ``transformers`` as a library from its config alone.

The Hugging Face config travels in ``hf_config`` (a plain dict, so ``create_encoder(**enc.config)`` rebuilds
the network with no hub access); medfm stores the weights (safetensors, config in the header), so imported
folders become ordinary medfm encoders. Inputs are medfm's: [0, 1] grey (or ``in_chans`` channels); grey is
repeated to the network's RGB and the source's ``pixel_mean`` / ``pixel_std`` are applied inside, so every
medfm command feeds it unchanged and the outputs equal the source model's on its own normalised input.

- ``forward(x)``: the backbone's own pooled output (``pooler_output``: post-LayerNorm class token for CLIP,
  the attention-pooling head for SigLIP, normalised average for ConvNeXt / Swin, average pool for ResNet).
- ``forward_features(x)``: four maps, shallow to deep (CNN / Swin stages at strides 4-32; for plain ViTs the
  patch tokens of four evenly spaced blocks reshaped to the grid, all at the patch stride).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medfm.errors import ConfigError
from medfm.models.base import Encoder, param_group
from medfm.models.registry import register_size

# model_type -> (family, kind of hidden states). "grid": CNN-like maps; "swin": reshaped_hidden_states;
# "tokens": (B, prefix + N, D) transformer tokens.
_TYPES: dict[str, tuple[str, str]] = {
    "resnet": ("cnn", "grid"),
    "convnext": ("cnn", "grid"),
    "convnextv2": ("cnn", "grid"),
    "swin": ("hybrid", "swin"),
    "swinv2": ("hybrid", "swin"),
    "clip_vision_model": ("vit", "tokens"),
    "siglip_vision_model": ("vit", "tokens"),
    "siglip2_vision_model": ("vit", "tokens"),
    "vit": ("vit", "tokens"),
    "dinov2": ("vit", "tokens"),
    "dinov2_with_registers": ("vit", "tokens"),
}
# Composite vision-text configs whose vision half is the backbone.
_VISION_OF = {"clip": "clip_vision_model", "siglip": "siglip_vision_model", "siglip2": "siglip2_vision_model"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def vision_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The vision backbone's config dict (the ``vision_config`` of a CLIP / SigLIP config)."""
    mt = hf_config.get("model_type")
    if mt in _VISION_OF:
        vc = dict(hf_config.get("vision_config") or {})
        vc["model_type"] = _VISION_OF[mt]
        return vc
    return dict(hf_config)


def supported(hf_config: dict[str, Any]) -> bool:
    return vision_config(hf_config).get("model_type") in _TYPES


def _build_hf(hf_config: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter every medfm command
    hf_logging.set_verbosity_error()
    cfg = dict(hf_config)
    mt = cfg.pop("model_type", None)
    if mt not in _TYPES:
        raise ConfigError(f"hf_vision: unsupported model_type {mt!r}; supported: {', '.join(sorted(_TYPES))}")
    for k in ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    conf = AutoConfig.for_model(mt, **cfg)
    conf._attn_implementation = "eager"  # exact and deterministic on every device; no optional kernels
    if mt in ("vit",):
        from transformers import ViTModel

        return ViTModel(conf, add_pooling_layer=False)
    return AutoModel.from_config(conf)


class HFVisionEncoder(Encoder):
    """A transformers vision backbone behind the medfm Encoder API."""

    def __init__(
        self,
        hf_config: dict[str, Any] | None = None,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int = 224,
        pixel_mean: tuple[float, ...] | None = IMAGENET_MEAN,
        pixel_std: tuple[float, ...] | None = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ConfigError("hf_vision encoders are 2D (spatial_dims=2)")
        hf = vision_config(hf_config or {"model_type": "convnext"})
        self.hf_type = str(hf.get("model_type"))
        self._family, self._states = _TYPES.get(self.hf_type, ("cnn", "grid"))
        self.model = _build_hf(hf)
        c = self.model.config
        self.src_chans = int(getattr(c, "num_channels", 3))
        if in_chans not in (1, self.src_chans):
            raise ConfigError(
                f"hf_vision: in_chans must be 1 (grey, repeated) or the network's {self.src_chans}"
            )
        self.spatial_dims, self.in_chans = 2, int(in_chans)
        self.img_size = (int(img_size),) * 2
        for name, v in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
            t = torch.tensor(v if v is not None else [0.0 if name == "pixel_mean" else 1.0] * self.src_chans)
            if t.numel() != self.src_chans:
                raise ConfigError(f"hf_vision: {name} needs {self.src_chans} values, got {t.numel()}")
            self.register_buffer(name, t.view(1, -1, 1, 1).float(), persistent=False)
        self._set_dims(c)
        self._src_size = int(getattr(c, "image_size", img_size) or img_size)

    def _set_dims(self, c: Any) -> None:
        if self._states == "grid":
            dims = list(c.hidden_sizes)
            self.feature_dims, self.feature_strides = dims, [4, 8, 16, 32]
            self.embed_dim = dims[-1]
        elif self._states == "swin":
            e, p = int(c.embed_dim), int(c.patch_size)
            self.feature_dims = [e, 2 * e, 4 * e, 8 * e]
            self.feature_strides = [p, 2 * p, 4 * p, 8 * p]
            self.embed_dim = int(getattr(c, "hidden_size", 8 * e))
        else:
            d, p = int(c.hidden_size), int(c.patch_size)
            self.feature_dims, self.feature_strides = [d] * 4, [p] * 4
            self.embed_dim = d
            n = int(c.num_hidden_layers)
            self._blocks = sorted({max(1, round(n * f)) for f in (0.25, 0.5, 0.75, 1.0)})
            self._prefix = {"siglip_vision_model": 0, "siglip2_vision_model": 0}.get(self.hf_type, 1)
            self._prefix += int(getattr(c, "num_register_tokens", 0) or 0)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.src_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def _run(self, x: torch.Tensor, hidden: bool) -> Any:
        kw: dict[str, Any] = {"output_hidden_states": hidden}
        if self._states == "tokens" and tuple(x.shape[-2:]) != (self._src_size, self._src_size):
            kw["interpolate_pos_encoding"] = True  # other input sizes: resize the position table
        return self.model(pixel_values=self._input(x), **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._run(x, hidden=False)
        pooled = out.pooler_output
        if pooled is None:  # ViT without a pooling layer: the final-norm class token
            pooled = out.last_hidden_state[:, 0]
        return pooled.flatten(1)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self._run(x, hidden=True)
        if self._states == "grid":
            return list(out.hidden_states[1:5])
        if self._states == "swin":
            r = out.reshaped_hidden_states
            return [r[0], r[1], r[2], r[-1]]
        h, w = (s // self.feature_strides[0] for s in x.shape[-2:])
        maps = []
        for i in self._blocks:
            t = out.hidden_states[i][:, self._prefix :]
            maps.append(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w))
        while len(maps) < 4:  # very shallow test models: repeat the deepest map
            maps.append(maps[-1])
        return maps

    def layer_groups(self) -> list[nn.Module]:
        """Embeddings first, then each block / stage (the longest ModuleList), then everything after."""
        lists = [m for m in self.model.modules() if isinstance(m, nn.ModuleList)]
        blocks = max(lists, key=len) if lists else nn.ModuleList()
        in_blocks = {id(p) for p in blocks.parameters()}
        first_block = next(iter(blocks.parameters()), None)
        before: dict[str, nn.Parameter] = {}
        after: dict[str, nn.Parameter] = {}
        seen_blocks = False
        for name, p in self.model.named_parameters():
            if first_block is not None and p is first_block:
                seen_blocks = True
            if id(p) in in_blocks:
                continue
            (after if seen_blocks else before)[name.replace(".", "_")] = p
        return [param_group(**before), *blocks, param_group(**after)]


register_size(HFVisionEncoder, "hf_vision", {},
              "A Hugging Face vision backbone (Swin, ConvNeXt, ResNet, CLIP/SigLIP vision) built by "
              "transformers from its config; imported folders load into it.")
