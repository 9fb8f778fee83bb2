"""Reports as bags of sentences: splitting, and pooling per-sentence text features into one per report.

Why: a radiology report states each finding in its own sentence ("No pleural effusion. Heart size is
normal."), while zero-shot prompts are single sentences. Embedding every sentence on its own and averaging
(in a space where the projection is affine) makes a report's similarity to an image the mean of its
sentences' similarities, so contrastive training on reports directly trains the per-sentence scores that
zero-shot prompts use. Randomly dropping sentences during training is a cheap text augmentation
(CXR-CLIP samples sentences for the same reason).
"""

from __future__ import annotations

import re

import torch

_HEADER = re.compile(r"\b[A-Z][A-Z ]{2,}:\s*")  # FINDINGS:, IMPRESSION:, COMPARISON: ...
_NUMBER = re.compile(r"(?:(?<=\s)|^)\d{1,2}[.)]\s+(?=[A-Za-z])")  # "1. Right nodule" list markers
# end of a sentence: . ! ? or ; followed by space/end — but not a decimal point ("3.5 cm")
_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a report without section headers or list numbers; the whole text if none are found."""
    t = _NUMBER.sub(" ", _HEADER.sub("\n", text or ""))
    out = [s.strip(" .;") for s in _SPLIT.split(t)]
    out = [s + "." for s in out if any(c.isalpha() for c in s)]
    return out or ([text.strip()] if text and text.strip() else [""])


def sentence_index(texts: list[str]) -> tuple[list[str], torch.Tensor]:
    """(unique sentences, index (N, M) into them per text, padded with -1)."""
    uniq: dict[str, int] = {}
    rows = []
    for t in texts:
        rows.append([uniq.setdefault(s, len(uniq)) for s in split_sentences(t)])
    m = max((len(r) for r in rows), default=1)
    index = torch.full((len(texts), m), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        index[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return list(uniq), index


def pool_sentences(
    features: torch.Tensor,
    index: torch.Tensor,
    drop: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean of ``features`` (S, D) over each row of ``index`` (B, M; -1 = padding) -> (B, D).

    ``drop`` > 0 leaves each sentence out with that probability (at least one is always kept).
    """
    valid = index >= 0
    keep = valid
    if drop > 0:
        r = torch.rand(index.shape, generator=generator)
        keep = valid & (r >= drop)
        # rows that lost every sentence keep their first one
        empty = ~keep.any(1)
        keep[empty, 0] = valid[empty, 0]
    w = keep.to(features.dtype)
    f = features[index.clamp(min=0)]  # (B, M, D)
    return (f * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
