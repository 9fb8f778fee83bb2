"""Adapting a pretrained encoder with few labels: linear probe, kNN, prototypes, fine-tune, LoRA, scratch."""

from medfm.tasks.adapt.protocol import Budget, parse_budgets, sample_labelled
from medfm.tasks.adapt.registry import ADAPTERS
from medfm.tasks.adapt.runner import AdaptConfig, run_adapt, summarize

__all__ = ["ADAPTERS", "AdaptConfig", "Budget", "parse_budgets", "run_adapt", "sample_labelled", "summarize"]
