"""A CLIP run's zero-shot classifier of one finding, as the binary :class:`Classifier` the audit takes.

Zero-shot scores a finding as softmax(scale * [sim(image, positive prompts), sim(image, negative prompts)])
(``medfm.tasks.vlm.zeroshot``). That is the sigmoid of one logit, z = scale * e . (pos - neg) with e the
image's normalised joint-space embedding, so the zero-shot model is an encoder plus a one-logit head and
every audit section (shift, OOD, fairness, calibration, explanations, TTA) applies to it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medfm.errors import InputError


class ZeroShotHead(nn.Module):
    """Pooled image features -> the zero-shot logit of one finding (the CLIP projection is kept as is)."""

    def __init__(self, img_norm: nn.Module, img_proj: nn.Module, pos: torch.Tensor, neg: torch.Tensor,
                 scale: float) -> None:
        super().__init__()
        self.img_norm, self.img_proj = img_norm, img_proj
        self.register_buffer("direction", (pos - neg).reshape(-1, 1).float())
        self.scale = float(scale)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        e = F.normalize(self.img_proj(self.img_norm(pooled)), dim=-1)
        return self.scale * (e @ self.direction)


def zeroshot_classifier(run: str | Path, label: str | None, prompts: str | None = None,
                        device: str | torch.device = "cpu"):
    """The zero-shot classifier of ``label`` from a CLIP run (prompts: None/'default', 'attributes' or a
    JSON file, as ``medfm zeroshot --prompts``); decision threshold 0.5 (positive prompts win)."""
    from medfm.models.clip import load_clip
    from medfm.tasks.adapt.classifier import Classifier
    from medfm.tasks.vlm.prompts import load_prompts
    from medfm.tasks.vlm.zeroshot import class_embeddings

    if not label:
        raise InputError(run, "a CLIP run is audited as the zero-shot classifier of one finding: give "
                              "--label (e.g. effusion) and optionally --prompts")
    model = load_clip(run, device=device).eval()
    ps = load_prompts(prompts, [label])
    if label not in ps:
        raise InputError(prompts, f"the prompts have no entry for {label!r} (they cover {', '.join(ps)})")
    with torch.no_grad():
        _, pos, neg = class_embeddings(model, {label: ps[label]})
        scale = float(model.scale())
    head = ZeroShotHead(model.img_norm, model.img_proj, pos[0], neg[0], scale)
    clf = Classifier(model.encoder, head, "binary", ["0", "1"], 0.5, model.preprocessing or {}, "zero-shot")
    clf.label_name = label
    return clf.to(device).eval()
