"""In-context segmentation (in the spirit of Iris, Gao et al. 2025): segment a structure in a new image from k
reference (image, mask) pairs, with no gradient update at inference.

The shared encoder embeds references and query. At every feature scale the references' features are pooled
inside / outside their masks into a foreground and a background prototype (averaged over the k references):
that pair is the *task embedding*. The query's features are then (a) modulated by FiLM from the task
embedding and (b) extended with cosine-similarity maps to the two prototypes; a U-Net decoder turns these
conditioned maps into a binary mask. Trained episodically (one structure per episode, sampled from
multi-class masks), the decoder learns to follow the prototypes rather than to memorise structures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfm.models.seg.unet_decoder import UNetDecoder


def _fit_mask(mask: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(N, *S) binary -> (N, 1, *size) soft coverage (area-average), so thin structures still count."""
    m = mask[:, None].float()
    return F.adaptive_avg_pool2d(m, size) if m.ndim == 4 else F.adaptive_avg_pool3d(m, size)


class IncontextSegmenter(nn.Module):
    def __init__(self, encoder: nn.Module, dim: int = 64, feature_size: int = 16) -> None:
        super().__init__()
        self.encoder, self.dim = encoder, dim
        nd = int(encoder.spatial_dims)
        conv = nn.Conv2d if nd == 2 else nn.Conv3d
        self.proj = nn.ModuleList(conv(c, dim, 1) for c in encoder.feature_dims)
        self.film = nn.ModuleList(nn.Linear(2 * dim, 2 * dim) for _ in encoder.feature_dims)
        for f in self.film:  # start as identity modulation
            nn.init.zeros_(f.weight)
            nn.init.zeros_(f.bias)
        # Prototype matching gives a reference-driven prior (PANet-style); the decoder only refines it, so the
        # prediction cannot ignore the references (a pure decoder tends to learn
        # "segment everything salient").
        self.prior_scale = nn.Parameter(torch.tensor(10.0))
        self.decoder = UNetDecoder(
            [dim + 2] * len(encoder.feature_dims),
            list(encoder.feature_strides),
            int(encoder.in_chans),
            2,
            nd,
            feature_size,
        )

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [p(f) for p, f in zip(self.proj, self.encoder.forward_features(x))]

    def task_embedding(self, ref_images: torch.Tensor, ref_masks: torch.Tensor) -> list[torch.Tensor]:
        """(B, K, C, *S) images and (B, K, *S) binary masks -> per scale (B, 2, dim) [fg, bg] prototypes."""
        b, k = ref_images.shape[:2]
        feats = self._features(ref_images.flatten(0, 1))
        masks = ref_masks.flatten(0, 1)
        protos = []
        for f in feats:
            m = _fit_mask(masks, tuple(f.shape[2:]))
            ff = f.flatten(2)  # (BK, D, n)
            mm = m.flatten(2)  # (BK, 1, n)
            fg = (ff * mm).sum(-1).view(b, k, -1).sum(1) / mm.sum(-1).view(b, k).sum(1, keepdim=True).clamp(
                min=1e-3
            )
            bg = (ff * (1 - mm)).sum(-1).view(b, k, -1).sum(1) / (1 - mm).sum(-1).view(b, k).sum(
                1, keepdim=True
            ).clamp(min=1e-3)
            protos.append(torch.stack([fg, bg], dim=1))
        return protos

    def segment(self, query: torch.Tensor, task: list[torch.Tensor]) -> torch.Tensor:
        """Query (B, C, *S) + task embedding -> logits (B, 2, *S) (channel 1 = the structure)."""
        cond, priors = [], []
        for f, p, film in zip(self._features(query), task, self.film):
            gamma, beta = film(p.flatten(1)).chunk(2, dim=-1)
            shape = (f.shape[0], -1) + (1,) * (f.ndim - 2)
            sim = torch.einsum("bd...,bkd->bk...", F.normalize(f, dim=1), F.normalize(p, dim=-1))
            cond.append(torch.cat([f * (1 + gamma.view(shape)) + beta.view(shape), sim], dim=1))
            mode = "bilinear" if f.ndim == 4 else "trilinear"
            priors.append(
                F.interpolate(sim[:, :1] - sim[:, 1:], size=query.shape[2:], mode=mode, align_corners=False)
            )
        prior = self.prior_scale * torch.stack(priors).mean(0)
        return self.decoder(cond, query) + torch.cat([-prior / 2, prior / 2], dim=1)

    def forward(self, query: torch.Tensor, ref_images: torch.Tensor, ref_masks: torch.Tensor) -> torch.Tensor:
        return self.segment(query, self.task_embedding(ref_images, ref_masks))
