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

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.errors import ConfigError, InputError
from medfm.models.base import Encoder

SAM_PIXEL_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_PIXEL_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W)."""

    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class MLP(nn.Module):
    """``layers`` of Linear with ReLU between (SAM's hypernetwork / IoU head)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, depth: int) -> None:
        super().__init__()
        dims = [d_in] + [hidden] * (depth - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1, self.lin2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


# ---------------------------------------------------------------------------------------------------------
# Image encoder: ViT with windowed attention and decomposed relative positions
# ---------------------------------------------------------------------------------------------------------
def _rel_pos(q_size: int, k_size: int, rel: torch.Tensor) -> torch.Tensor:
    """Relative position table (q_size, k_size, C), interpolating the stored one when the grid changed."""
    n = 2 * max(q_size, k_size) - 1
    if rel.shape[0] != n:
        rel = F.interpolate(rel.T[None], size=n, mode="linear", align_corners=False)[0].T
    q = torch.arange(q_size, device=rel.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=rel.device)[None, :] * max(q_size / k_size, 1.0)
    idx = (q - k) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel[idx.long()]


class SAMAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, rel_size: tuple[int, int] | None) -> None:
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
        self.use_rel_pos = rel_size is not None
        if rel_size is not None:
            hd = dim // num_heads
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size[0] - 1, hd))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size[1] - 1, hd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            rh, rw = _rel_pos(h, h, self.rel_pos_h), _rel_pos(w, w, self.rel_pos_w)
            rq = q.reshape(-1, h, w, q.shape[-1])
            bias_h = torch.einsum("bhwc,hkc->bhwk", rq, rh)
            bias_w = torch.einsum("bhwc,wkc->bhwk", rq, rw)
            attn = (attn.view(-1, h, w, h, w) + bias_h[..., :, None] + bias_w[..., None, :]).view(
                -1, h * w, h * w
            )
        out = (
            (attn.softmax(-1) @ v)
            .view(b, self.num_heads, h, w, -1)
            .permute(0, 2, 3, 1, 4)
            .reshape(b, h, w, -1)
        )
        return self.proj(out)


class SAMBlock(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window: int, grid: tuple[int, int]
    ) -> None:
        super().__init__()
        self.window = window
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = SAMAttention(dim, num_heads, (window, window) if window else grid)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            b, h, w, c = y.shape
            s = self.window
            ph, pw = (s - h % s) % s, (s - w % s) % s
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            y = y.view(b, hp // s, s, wp // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)
            y = self.attn(y)
            y = (
                y.view(b, hp // s, wp // s, s, s, c)
                .permute(0, 1, 3, 2, 4, 5)
                .reshape(b, hp, wp, c)[:, :h, :w]
            )
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)


class SAMImageEncoder(Encoder):
    """SAM's image encoder (its neck lives in PromptableSegmenter) as a 2D medfm ViT Encoder."""

    _family = "vit"

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.spatial_dims, self.in_chans, self.img_size = 2, in_chans, (img_size, img_size)
        self.patch_size, self.embed_dim = patch_size, embed_dim
        g = img_size // patch_size
        self.grid = (g, g)
        self.patch_embed = _PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, embed_dim))
        glob = set(global_attn_indexes)
        self.blocks = nn.ModuleList(
            SAMBlock(embed_dim, num_heads, mlp_ratio, 0 if i in glob else window_size, self.grid)
            for i in range(depth)
        )
        self.feature_indices = [max(0, (i + 1) * depth // 4 - 1) for i in range(4)]
        self.feature_dims, self.feature_strides = [embed_dim] * 4, [patch_size] * 4
        self.config = {
            "name": "sam_image_encoder",
            "img_size": img_size,
            "patch_size": patch_size,
            "in_chans": in_chans,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "window_size": window_size,
            "global_attn_indexes": sorted(glob),
        }
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        t = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        pos = self.pos_embed
        if t.shape[1:3] != pos.shape[1:3]:  # other input sizes: resize the absolute position grid
            pos = F.interpolate(
                pos.permute(0, 3, 1, 2), size=t.shape[1:3], mode="bicubic", align_corners=False
            ).permute(0, 2, 3, 1)
        t = t + pos
        feats = []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            feats += [t.permute(0, 3, 1, 2)] * self.feature_indices.count(i)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1].mean((2, 3))


def make_neck(in_dim: int, out_dim: int = 256) -> nn.Sequential:
    """SAM's neck: 1x1 conv to ``out_dim``, LayerNorm2d, 3x3 conv, LayerNorm2d (keys neck.0..neck.3)."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, 1, bias=False),
        LayerNorm2d(out_dim),
        nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False),
        LayerNorm2d(out_dim),
    )


# ---------------------------------------------------------------------------------------------------------
# Prompt encoder
# ---------------------------------------------------------------------------------------------------------
class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of normalised (x, y) coordinates (Tancik et al. 2020)."""

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        c = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix * (2 * math.pi)
        return torch.cat([c.sin(), c.cos()], dim=-1)

    def grid(self, h: int, w: int) -> torch.Tensor:
        """(C, h, w) encoding of the cell centres of an h x w grid."""
        dev = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        return self._encode(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)

    def points(self, xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(..., 2) pixel (x, y) -> (..., C)."""
        scale = torch.tensor([image_size[1], image_size[0]], device=xy.device, dtype=torch.float32)
        return self._encode(xy.float() / scale)


class PromptEncoder(nn.Module):
    """Points (B, N, 2) pixel (x, y) with labels (B, N) in {1 fg, 0 bg, -1 pad}; boxes (B, 4) x0 y0 x1 y1;
    masks (B, 1, 4h, 4w) logits -> sparse (B, n_tokens, D) and dense (B, D, h, w) embeddings."""

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim, self.image_embedding_size = embed_dim, tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: background point, 1: foreground point, 2: box top-left, 3: box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, 2, 2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, 2, 2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, 1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer.grid(*self.image_embedding_size)[None]

    def _points(self, xy: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        xy = xy + 0.5  # pixel centres
        if pad:  # a padding point keeps the token count fixed when there is no box
            xy = torch.cat([xy, xy.new_zeros(xy.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        emb = self.pe_layer.points(xy, self.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, self.not_a_point_embed.weight.expand_as(emb), emb)
        emb = (
            emb + (lab == 0) * self.point_embeddings[0].weight + (lab == 1) * self.point_embeddings[1].weight
        )
        return emb

    def _boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = self.pe_layer.points(boxes.reshape(-1, 2, 2) + 0.5, self.input_image_size)
        return torch.stack(
            [
                corners[:, 0] + self.point_embeddings[2].weight[0],
                corners[:, 1] + self.point_embeddings[3].weight[0],
            ],
            dim=1,
        )

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        batch: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch or (
            points[0].shape[0]
            if points is not None
            else boxes.shape[0]
            if boxes is not None
            else masks.shape[0]
            if masks is not None
            else 1
        )
        sparse = [self.no_mask_embed.weight.new_zeros(b, 0, self.embed_dim)]
        if points is not None:
            sparse.append(self._points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._boxes(boxes))
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, *self.image_embedding_size)
        return torch.cat(sparse, dim=1), dense


# ---------------------------------------------------------------------------------------------------------
# Mask decoder: two-way transformer + hypernetwork masks + IoU head
# ---------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head attention with an optional downscaled internal width (token<->image cross attention)."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ConfigError(f"attention width {inner} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj = (
            nn.Linear(dim, inner),
            nn.Linear(dim, inner),
            nn.Linear(dim, inner),
        )
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TwoWayAttentionBlock(nn.Module):
    """Tokens attend to themselves, then to the image; then the image attends back to the tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))
        self.cross_attn_token_to_image = Attention(dim, num_heads, 2)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.cross_attn_image_to_token = Attention(dim, num_heads, 2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int = 2, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, i == 0) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        keys, key_pe = image.flatten(2).transpose(1, 2), image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MaskDecoder(nn.Module):
    def __init__(
        self,
        transformer_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        d = transformer_dim
        self.transformer = TwoWayTransformer(depth, d, num_heads, mlp_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, d)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, d)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, 2, 2),
            LayerNorm2d(d // 4),
            nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, 2, 2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(d, d, d // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(d, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> low-res mask logits (B, M, 4h, 4w) and predicted IoU (B, M); M = 3 multimask or 1."""
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], 0)[None].expand(b, -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)
        src = image_embeddings + dense
        _, c, h, w = src.shape
        hs, keys = self.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
        iou_out, mask_out = hs[:, 0], hs[:, 1 : 1 + self.num_mask_tokens]
        up = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([m(mask_out[:, i]) for i, m in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper @ up.flatten(2)).view(b, -1, *up.shape[2:])
        iou = self.iou_prediction_head(iou_out)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou[:, sl]


# ---------------------------------------------------------------------------------------------------------
# The promptable model
# ---------------------------------------------------------------------------------------------------------
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
