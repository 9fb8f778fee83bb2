"""Report generation with the run's decoder (greedy or beam search), and its evaluation against references."""

from __future__ import annotations

from typing import Any

import torch

from medfm.eval.text_metrics import report_metrics


def generate_reports(
    model: Any, images: torch.Tensor, beam: int = 1, batch_size: int = 32, max_len: int | None = None
) -> list[str]:
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        out += model.generate(images[i : i + batch_size], beam=beam, max_len=max_len)
    return out


def evaluate_reports(preds: list[str], refs: list[str], findings: list[str] | None = None) -> dict[str, Any]:
    """BLEU-1..4, ROUGE-L, clinical P/R/F1 (see medfm.eval.text_metrics)."""
    return report_metrics(preds, refs, findings)
