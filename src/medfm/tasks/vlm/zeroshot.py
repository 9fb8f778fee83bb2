"""Zero-shot classification: each finding scored as softmax(scale * [sim(image, positive prompts),
sim(image, negative prompts)]), multi-label, with AUROC per finding when labels are known."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfm.tasks.vlm.prompts import Prompts


def ensemble_embedding(model: Any, texts: list[str]) -> torch.Tensor:
    """Mean of the L2-normalised embeddings of a prompt ensemble, renormalised (CLIP's prompt ensembling)."""
    return F.normalize(model.encode_texts(texts).mean(0), dim=-1)


def class_embeddings(model: Any, prompts: Prompts) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(finding names, positive (K, D), negative (K, D)) ensemble embeddings."""
    names = list(prompts)
    pos = torch.stack([ensemble_embedding(model, prompts[n]["positive"]) for n in names])
    neg = torch.stack([ensemble_embedding(model, prompts[n]["negative"]) for n in names])
    return names, pos, neg


def zeroshot_probs(img_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, K) probability that each finding is present: softmax between its positive and negative prompts."""
    logits = torch.stack([img_emb @ pos.t(), img_emb @ neg.t()], -1) * scale
    return logits.softmax(-1)[..., 0]


def auroc_per_class(y: np.ndarray, p: np.ndarray, names: list[str]) -> dict[str, float | None]:
    """AUROC per column; None where a column has a single class (or only unknown labels, -1)."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, float | None] = {}
    for j, n in enumerate(names):
        keep = y[:, j] >= 0
        yy = y[keep, j]
        out[n] = float(roc_auc_score(yy, p[keep, j])) if len(np.unique(yy)) == 2 else None
    return out


def evaluate_zeroshot(
    model: Any,
    images: torch.Tensor | None,
    prompts: Prompts,
    labels: np.ndarray | None = None,
    label_names: list[str] | None = None,
    img_emb: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Probabilities for every finding in ``prompts`` and, where ``labels`` has a column of the same name,
    AUROC. Pass ``img_emb`` to reuse already computed image embeddings."""
    if img_emb is None:
        img_emb = model.encode_images(images)
    names, pos, neg = class_embeddings(model, prompts)
    probs = zeroshot_probs(img_emb, pos, neg, float(model.scale().detach())).numpy()
    out: dict[str, Any] = {"findings": names, "probs": probs, "n": int(len(probs))}
    if labels is not None and label_names:
        common = [n for n in names if n in label_names]
        if common:
            y = np.stack([labels[:, label_names.index(n)] for n in common], 1)
            p = np.stack([probs[:, names.index(n)] for n in common], 1)
            au = auroc_per_class(y, p, common)
            out["auroc"] = au
            vals = [v for v in au.values() if v is not None]
            out["mean_auroc"] = float(np.mean(vals)) if vals else None
            out["prevalence"] = {n: float((y[:, i] > 0).mean()) for i, n in enumerate(common)}
    return out


def select_on_split(model: Any, candidates: dict[str, Prompts], img_emb: torch.Tensor, labels: np.ndarray,
                    label_names: list[str]) -> tuple[Prompts, dict[str, str], dict[str, dict]]:
    """Choose per finding among candidate prompt sets by AUROC on a labelled split (pass validation
    embeddings, never the test ones). Returns (prompts, finding -> chosen set, set -> finding -> AUROC)."""
    from medfm.tasks.vlm.prompts import select_prompts

    scores = {n: evaluate_zeroshot(model, None, pr, labels, label_names, img_emb=img_emb).get("auroc") or {}
              for n, pr in candidates.items()}
    prompts, chosen = select_prompts(candidates, scores)
    return prompts, chosen, scores
