"""Promptable segmentation, SAM-style (Kirillov et al. 2023): encoder + neck, prompt encoder, mask decoder.

- ``PromptEncoder``: box corners and clicked points (label 1 foreground, 0 background) -> sparse embeddings
  with a random-Fourier positional encoding; an optional low-res mask prompt -> a dense embedding.
- ``MaskDecoder``: a small two-way transformer between prompt tokens and image tokens, then a few mask
  tokens (one unambiguous + ``num_multimask_outputs``) that become per-pixel masks via a hypernetwork,
  and an IoU-prediction head that scores each mask.
- ``SAMImageEncoder``: SAM's ViT (windowed attention + decomposed relative position), a medfm ``Encoder``.
- ``PromptableSegmenter``: any medfm encoder's last feature map -> ``neck`` (conv to 256 channels) ->
  decoder. ``load_sam_checkpoint`` reads an official SAM / MedSAM file (local only) into it, consuming every
  key or failing with the keys it could not place.

Module and parameter names follow the official key layout on purpose, so converting a checkpoint is a
prefix rename and nothing is silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.errors import ConfigError, InputError
from medfm.models.base import Encoder
from medfm.models.seg.sam_encoder import SAM_PIXEL_MEAN, SAM_PIXEL_STD, SAMImageEncoder, make_neck
from medfm.models.seg.sam_prompt import MaskDecoder, PromptEncoder


class PromptableSegmenter(nn.Module):
    """encoder -> neck -> (prompt encoder, mask decoder). Images (B, C, H, W) in [0, 1], ``img_size``."""

    def __init__(
        self,
        encoder: Encoder,
        img_size: int,
        prompt_dim: int = 256,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        decoder_mlp_dim: int = 2048,
        mask_in_chans: int = 16,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        pixel_mean: tuple[float, ...] | None = None,
        pixel_std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        stride = int(encoder.feature_strides[-1])
        if img_size % stride:
            raise ConfigError(f"img_size {img_size} is not divisible by the encoder stride {stride}")
        self.encoder, self.img_size = encoder, img_size
        grid = (img_size // stride, img_size // stride)
        self.neck = make_neck(int(encoder.feature_dims[-1]), prompt_dim)
        self.prompt_encoder = PromptEncoder(prompt_dim, grid, (img_size, img_size), mask_in_chans)
        self.mask_decoder = MaskDecoder(
            prompt_dim,
            decoder_depth,
            decoder_heads,
            decoder_mlp_dim,
            num_multimask_outputs,
            iou_head_depth,
            iou_head_hidden_dim,
        )
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        self.config: dict[str, Any] = {
            "img_size": img_size,
            "prompt_dim": prompt_dim,
            "decoder_depth": decoder_depth,
            "decoder_heads": decoder_heads,
            "decoder_mlp_dim": decoder_mlp_dim,
            "mask_in_chans": mask_in_chans,
            "num_multimask_outputs": num_multimask_outputs,
            "iou_head_depth": iou_head_depth,
            "iou_head_hidden_dim": iou_head_hidden_dim,
            "pixel_mean": pixel_mean,
            "pixel_std": pixel_std,
            "encoder": dict(getattr(encoder, "config", {})),
        }

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, prompt_dim, h, w). Grey is repeated for RGB (SAM) encoders."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ConfigError(
                f"promptable model expects {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}"
            )
        want = int(self.encoder.in_chans)
        if x.shape[1] == 1 and want == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.pixel_mean is not None:
            mean = torch.tensor(self.pixel_mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.pixel_std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return self.neck(self.encoder.forward_features(x)[-1])

    def decode(
        self, emb: torch.Tensor, points=None, boxes=None, masks=None, multimask_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits at full image size (B, M, H, W) and predicted IoU (B, M) for embedded images."""
        sparse, dense = self.prompt_encoder(points, boxes, masks, batch=emb.shape[0])
        low, iou = self.mask_decoder(emb, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output)
        return F.interpolate(
            low, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
        ), iou

    def forward(self, x: torch.Tensor, points=None, boxes=None, masks=None, multimask_output: bool = True):
        return self.decode(self.embed_image(x), points, boxes, masks, multimask_output)


def build_promptable(encoder: Encoder, img_size: int, **kw: Any) -> PromptableSegmenter:
    """A promptable segmenter on any 2D medfm encoder (its deepest feature map)."""
    if int(getattr(encoder, "spatial_dims", 2)) != 2:
        raise ConfigError("promptable segmentation supports 2D encoders only")
    return PromptableSegmenter(encoder, img_size, **kw)


# ---------------------------------------------------------------------------------------------------------
# Official SAM / MedSAM checkpoints
# ---------------------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pth/.pt file (weights_only: never unpickles arbitrary objects)."""
    from medfm.models.checkpoint import read_weights

    return read_weights(path)


def sam_config_from_state(
    sd: dict[str, torch.Tensor], path: str | Path = "", decoder_heads: int = 8
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(image encoder kwargs, PromptableSegmenter kwargs) inferred from tensor shapes of an official file."""

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise InputError(path, f"not a SAM checkpoint: missing key '{key}'")
        return sd[key]

    pe = need("image_encoder.patch_embed.proj.weight")
    dim, in_chans, patch = int(pe.shape[0]), int(pe.shape[1]), int(pe.shape[2])
    grid = int(need("image_encoder.pos_embed").shape[1])
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("image_encoder.blocks."))
    head_dim = int(need("image_encoder.blocks.0.attn.rel_pos_h").shape[1])
    sizes = [(int(need(f"image_encoder.blocks.{i}.attn.rel_pos_h").shape[0]) + 1) // 2 for i in range(depth)]
    glob = [i for i, s in enumerate(sizes) if s == grid]
    windows = {s for s in sizes if s != grid}
    if len(windows) > 1:
        raise InputError(path, f"blocks use several window sizes {sorted(windows)}; expected one")
    enc = {
        "img_size": grid * patch,
        "patch_size": patch,
        "in_chans": in_chans,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": dim // head_dim,
        "window_size": windows.pop() if windows else 0,
        "global_attn_indexes": tuple(glob),
        "mlp_ratio": need("image_encoder.blocks.0.mlp.lin1.weight").shape[0] / dim,
    }
    pd = int(need("prompt_encoder.no_mask_embed.weight").shape[1])
    dec_depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("mask_decoder.transformer.layers."))
    iou_layers = 1 + max(
        int(k.split(".")[3]) for k in sd if k.startswith("mask_decoder.iou_prediction_head.")
    )
    model = {
        "img_size": grid * patch,
        "prompt_dim": pd,
        "decoder_depth": dec_depth,
        "decoder_heads": decoder_heads,
        "decoder_mlp_dim": int(need("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0]),
        "mask_in_chans": int(need("prompt_encoder.mask_downscaling.3.weight").shape[0]),
        "num_multimask_outputs": int(need("mask_decoder.mask_tokens.weight").shape[0]) - 1,
        "iou_head_depth": iou_layers,
        "iou_head_hidden_dim": int(need("mask_decoder.iou_prediction_head.layers.0.weight").shape[0]),
        "pixel_mean": SAM_PIXEL_MEAN[:in_chans] if in_chans == 3 else None,
        "pixel_std": SAM_PIXEL_STD[:in_chans] if in_chans == 3 else None,
    }
    return enc, model


def sam_key_to_medfm(key: str) -> str:
    """Official key -> PromptableSegmenter key (image_encoder.neck -> neck, image_encoder -> encoder)."""
    if key.startswith("image_encoder.neck."):
        return key[len("image_encoder.") :]
    if key.startswith("image_encoder."):
        return "encoder." + key[len("image_encoder.") :]
    return key


def load_sam_checkpoint(
    path: str | Path, decoder_heads: int = 8
) -> tuple[PromptableSegmenter, dict[str, Any]]:
    """Build a PromptableSegmenter from an official SAM / MedSAM file; every key must be placed.

    Returns (model, report) with the inferred config and the number of keys loaded. ``decoder_heads``
    cannot be read from shapes (SAM and MedSAM use 8).
    """
    sd = read_state_dict(path)
    enc_kw, model_kw = sam_config_from_state(sd, path, decoder_heads)
    model = PromptableSegmenter(SAMImageEncoder(**enc_kw), **model_kw)
    mapped = {sam_key_to_medfm(k): v for k, v in sd.items()}
    own = model.state_dict()
    unexpected = sorted(k for k in mapped if k not in own)
    missing = sorted(k for k in own if k not in mapped)
    if unexpected or missing:
        raise InputError(
            path, f"SAM checkpoint keys do not fit: unexpected {unexpected[:5]}, missing {missing[:5]}"
        )
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise InputError(
            path,
            f"shape mismatch for {bad[:3]} (e.g. {tuple(mapped[bad[0]].shape)} vs "
            f"{tuple(own[bad[0]].shape)})",
        )
    model.load_state_dict(mapped, strict=True)
    model.eval()
    return model, {"encoder": enc_kw, "model": model_kw, "keys_loaded": len(mapped), "keys_ignored": 0}
