"""The adaptation methods, by name. Each is registered in its own module with ``@ADAPTERS.register``; the
registry imports those modules on its first lookup (a new method module adds one line to ``_METHODS``).

A method is a callable ``fit_predict(ctx: AdaptContext, train_idx, seed) -> MethodOutput``; ``uses_features``
(set by ``feature_method``) tells the runner it only needs the cached frozen features.
"""

from __future__ import annotations

from medfm.registry import Registry

_METHODS = ("linear", "knn", "prototype", "finetune", "lpft", "lora", "scratch")
ADAPTERS: Registry = Registry("adaptation method",
                              providers=tuple(f"medfm.tasks.adapt.{m}" for m in _METHODS))


def feature_method(fn):
    """Mark a method that works on frozen, cached features (no encoder forward passes of its own)."""
    fn.uses_features = True
    return fn


def seed_independent(fn):
    """Mark a method whose result depends only on its labelled subset, never on the seed; with all labels
    (one subset for every seed) the runner runs it once instead of repeating identical numbers."""
    fn.seed_independent = True
    return fn


def no_model(fn):
    """Mark a method that keeps no model to save (kNN: a lookup over the training features)."""
    fn.no_model = True
    return fn
