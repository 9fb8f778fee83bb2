"""Adapting a pretrained encoder with few labels: linear probe, kNN, prototypes, fine-tune, LoRA, scratch;
the adapted classifier that comes out of it."""

from medfm.tasks.adapt.classifier import Classifier, load_classifier, predict_store
from medfm.tasks.adapt.protocol import Budget, parse_budgets, sample_labelled
from medfm.tasks.adapt.registry import ADAPTERS
from medfm.tasks.adapt.runner import AdaptConfig, run_adapt, summarize
from medfm.tasks.adapt.single import fit_classifier

__all__ = ["ADAPTERS", "AdaptConfig", "Budget", "Classifier", "fit_classifier", "load_classifier",
           "parse_budgets", "predict_store", "run_adapt", "sample_labelled", "summarize"]
