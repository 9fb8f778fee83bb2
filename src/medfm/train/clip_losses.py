"""CLIP-style training losses, pure functions of tensors: symmetric InfoNCE (CLIP), hard-negative
sampling and image-text matching (ALBEF/BLIP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medfm.models.fusion import ITMFusion


def clip_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised embeddings (B, D); ``logit_scale`` is exp(1/temperature).

    ``positives`` (B, B) bool marks extra positive pairs (e.g. identical report texts, which are not
    negatives of each other); targets are then spread uniformly over a row's positives.
    """
    logits = logit_scale * img @ txt.t()
    if positives is None:
        tgt = torch.arange(img.shape[0], device=img.device)
        return 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.t(), tgt))
    p = positives.float()
    t_i = p / p.sum(1, keepdim=True)
    t_t = p.t() / p.t().sum(1, keepdim=True)
    return 0.5 * (
        -(t_i * logits.log_softmax(1)).sum(1).mean() - (t_t * logits.t().log_softmax(1)).sum(1).mean()
    )


def sample_hard_negatives(
    sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each row of ``sim`` (B, B), one column index drawn with probability softmax(sim) over the
    non-positive columns: similar-but-wrong pairs are drawn most often. -1 where a row has no negative."""
    w = sim.detach().float().softmax(1).masked_fill(positives, 0.0)
    none = w.sum(1) <= 0
    w[none] = (~positives[none]).float()  # underflow: fall back to uniform over negatives
    out = torch.full((sim.shape[0],), -1, dtype=torch.long, device=sim.device)
    ok = w.sum(1) > 0
    if ok.any():
        out[ok] = torch.multinomial(w[ok], 1, generator=generator).squeeze(1)
    return out


def itm_loss(
    fusion: ITMFusion,
    img_tok: torch.Tensor,
    txt_tok: torch.Tensor,
    txt_mask: torch.Tensor,
    sim: torch.Tensor,
    positives: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of match / no-match over the B positive pairs and up to 2B hard negatives."""
    b = img_tok.shape[0]
    neg_t = sample_hard_negatives(sim, positives)  # a hard text for each image
    neg_i = sample_hard_negatives(sim.t(), positives.t())  # a hard image for each text
    ar = torch.arange(b, device=img_tok.device)
    vi, vt = neg_t >= 0, neg_i >= 0
    ii = torch.cat([ar, ar[vi], neg_i[vt]])
    tt = torch.cat([ar, neg_t[vi], ar[vt]])
    labels = torch.cat([torch.ones(b), torch.zeros(int(vi.sum()) + int(vt.sum()))]).long().to(img_tok.device)
    logits = fusion(img_tok[ii], txt_tok[tt], txt_mask[tt])
    return F.cross_entropy(logits, labels)


def same_text(texts: list[str]) -> torch.Tensor:
    """(B, B) bool: report i and report j are the same text (so neither is a negative of the other)."""
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    k = torch.tensor([ids[t] for t in texts])
    return k[:, None] == k[None, :]
