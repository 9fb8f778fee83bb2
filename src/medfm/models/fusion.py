"""Image-text matching (ITM) fusion: text tokens attend to visual tokens, then a match / no-match head.

This is the ALBEF/BLIP-style matching module kept small: a few transformer decoder layers (self-attention
over the text, cross-attention into the image tokens), the first text token (BERT's [CLS]) read out by a
two-way linear head. It scores a specific (image, report) pair, which a dot product of pooled embeddings
cannot do as finely, and is what VQA and re-ranking use.
"""

from __future__ import annotations

import torch
from torch import nn


class ITMFusion(nn.Module):
    """Cross-attention fusion of text tokens (B, L, text_dim) with image tokens (B, N, image_dim)."""

    def __init__(self, text_dim: int, image_dim: int, dim: int = 128, depth: int = 1, heads: int = 4) -> None:
        super().__init__()
        self.text_in = nn.Linear(text_dim, dim)
        self.image_in = nn.Linear(image_dim, dim)
        layer = nn.TransformerDecoderLayer(
            dim, heads, dim_feedforward=dim * 4, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerDecoder(layer, depth)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, 2): index 1 = "this report matches this image"."""
        pad = (text_mask == 0) if text_mask is not None else None
        h = self.layers(self.text_in(text_tokens), self.image_in(image_tokens), tgt_key_padding_mask=pad)
        return self.head(self.norm(h[:, 0]))

    def match_prob(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self(image_tokens, text_tokens, text_mask).softmax(-1)[:, 1]
