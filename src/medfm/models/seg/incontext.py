"""In-context segmentation (in the spirit of Iris, Gao et al. 2025): segment a structure in a new image from k
reference (image, mask) pairs, with no gradient update at inference.

The shared encoder embeds references and query. At every feature scale the references' features are pooled
inside / outside their masks into a foreground and a background prototype (averaged over the k references):
that pair is the *task embedding*. The query's features are then (a) modulated by FiLM from the task
embedding and (b) extended with cosine-similarity maps to the two prototypes; a U-Net decoder turns these
conditioned maps into a binary mask. With ``prior="knn"`` a non-parametric path is added: every query
position is compared (cosine-similarity kernel) with all reference positions, and the log-ratio of its
kernel density under foreground vs background positions is a label-propagation map that handles
multi-modal backgrounds a single prototype cannot; it enters the
decoder as a channel and the logits as a fixed-sign prior. Trained episodically (one structure per
episode, sampled from multi-class masks), the decoder learns to follow the prototypes rather than to
memorise structures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medfm.models.seg.unet_decoder import UNetDecoder


def _fit_mask(mask: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(N, *S) binary -> (N, 1, *size) soft coverage (area-average), so thin structures still count."""
    m = mask[:, None].float()
    return F.adaptive_avg_pool2d(m, size) if m.ndim == 4 else F.adaptive_avg_pool3d(m, size)


@dataclass
class IncontextTask:
    """What the references say about the structure: per-scale [fg, bg] prototypes (B, 2, dim), and for the
    kNN prior the references' deepest features (B, K*n, dim) with their soft mask values (B, K*n)."""

    protos: list[torch.Tensor]
    ref_feats: torch.Tensor | None = None
    ref_masks: torch.Tensor | None = None


PRIORS = ("prototype", "knn")


class IncontextSegmenter(nn.Module):
    def __init__(
        self, encoder: nn.Module, dim: int = 64, feature_size: int = 16, prior: str = "prototype"
    ) -> None:
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        self.encoder, self.dim, self.prior = encoder, dim, prior
        extra = 3 if prior == "knn" else 2
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
        if prior == "knn":
            self.knn_log_temp = nn.Parameter(torch.tensor(-2.3))  # softmax temperature ~0.1
            self.knn_scale = nn.Parameter(torch.tensor(1.0))
        self.decoder = UNetDecoder(
            [dim + extra] * len(encoder.feature_dims),
            list(encoder.feature_strides),
            int(encoder.in_chans),
            2,
            nd,
            feature_size,
        )

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [p(f) for p, f in zip(self.proj, self.encoder.forward_features(x))]

    def task_embedding(self, ref_images: torch.Tensor, ref_masks: torch.Tensor) -> IncontextTask:
        """(B, K, C, *S) images and (B, K, *S) binary masks -> the task (prototypes, kNN memory)."""
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
        task = IncontextTask(protos)
        if self.prior == "knn":
            f = feats[-1]
            m = _fit_mask(masks, tuple(f.shape[2:]))
            task.ref_feats = F.normalize(f.flatten(2).transpose(1, 2), dim=-1).reshape(b, -1, f.shape[1])
            task.ref_masks = m.flatten(1).reshape(b, -1)
        return task

    def knn_map(self, f: torch.Tensor, task: IncontextTask) -> torch.Tensor:
        """Query features (B, D, *s) -> (B, 1, *s) log-ratio of the query's kernel density under the
        references' foreground vs background positions (soft mask weights, each side normalised by its
        mass, so a small structure is not outvoted by the larger background)."""
        q = F.normalize(f.flatten(2).transpose(1, 2), dim=-1)  # (B, n, D)
        logits = q @ task.ref_feats.transpose(1, 2) / self.knn_log_temp.exp()  # (B, n, K*n)
        m = task.ref_masks[:, None]  # (B, 1, K*n)
        eps = 1e-4
        fg = torch.logsumexp(logits + (m + eps).log(), -1) - (m.sum(-1) + eps).log()
        bg = torch.logsumexp(logits + (1 - m + eps).log(), -1) - ((1 - m).sum(-1) + eps).log()
        return (fg - bg).view(f.shape[0], 1, *f.shape[2:])

    def segment(self, query: torch.Tensor, task: IncontextTask) -> torch.Tensor:
        """Query (B, C, *S) + task embedding -> logits (B, 2, *S) (channel 1 = the structure)."""
        cond, priors = [], []
        feats = self._features(query)
        mode = "bilinear" if query.ndim == 4 else "trilinear"
        knn = self.knn_map(feats[-1], task) if self.prior == "knn" else None
        for f, p, film in zip(feats, task.protos, self.film):
            gamma, beta = film(p.flatten(1)).chunk(2, dim=-1)
            shape = (f.shape[0], -1) + (1,) * (f.ndim - 2)
            sim = torch.einsum("bd...,bkd->bk...", F.normalize(f, dim=1), F.normalize(p, dim=-1))
            parts = [f * (1 + gamma.view(shape)) + beta.view(shape), sim]
            if knn is not None:
                k_map = F.interpolate(knn, size=f.shape[2:], mode=mode, align_corners=False)
                parts.append(torch.tanh(k_map / 4))  # bounded input channel
            cond.append(torch.cat(parts, dim=1))
            priors.append(
                F.interpolate(sim[:, :1] - sim[:, 1:], size=query.shape[2:], mode=mode, align_corners=False)
            )
        prior = self.prior_scale * torch.stack(priors).mean(0)
        if knn is not None:
            # log-odds of the propagated label: a confident "this looks like the reference structure"
            # evidence "looks like the reference structure rather than its surroundings"
            prior = prior + self.knn_scale * F.interpolate(
                knn, size=query.shape[2:], mode=mode, align_corners=False
            )
        return self.decoder(cond, query) + torch.cat([-prior / 2, prior / 2], dim=1)

    def forward(self, query: torch.Tensor, ref_images: torch.Tensor, ref_masks: torch.Tensor) -> torch.Tensor:
        return self.segment(query, self.task_embedding(ref_images, ref_masks))
