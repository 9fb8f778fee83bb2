"""Model card section of adapted classifiers (kind "classifier", from ``medfm adapt --save-model``)."""

from __future__ import annotations

from typing import Any

from medfm.modelcard.common import SECTIONS, fmt

_METRICS = ("auroc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "ece", "val_auroc")


def _threshold(config: dict[str, Any]) -> str:
    thr, rule = config.get("threshold"), config.get("threshold_rule") or "given"
    if config.get("task") == "multiclass" or thr is None:
        return "argmax over classes (no threshold)"
    if isinstance(thr, list):
        return f"per label {', '.join(fmt(float(t)) for t in thr)} ({rule})"
    return f"{fmt(float(thr))} on the positive-class probability ({rule})"


def _budget(b: Any) -> str:
    if not isinstance(b, dict):
        return "–"
    if b.get("regime") == "shots":
        return f"{int(b.get('value', 0))} labelled images per class"
    return f"{100 * float(b.get('value', 1.0)):g}% of the training labels"


@SECTIONS.register("classifier")
def section(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Method, encoder, classes, threshold and the test metrics of the adaptation run it came from."""
    enc = config.get("encoder") or {}
    head = config.get("head") or {}
    classes = ", ".join(f"`{c}`" for c in config.get("classes") or []) or "–"
    rows = "\n".join(f"| {k} | {fmt(metrics[k])} |" for k in _METRICS if k in metrics)
    table = f"| metric | value |\n|---|---|\n{rows}\n" if rows else "not recorded\n"
    check = metrics.get("max_abs_diff_vs_run")
    check_line = ("" if check is None else
                  f"\nReloaded from these files, the model reproduces the run's test probabilities within "
                  f"{fmt(float(check))}.\n")
    if "imported" in config:  # a published classifier (e.g. torchxrayvision) with its own heads
        checks = "".join(f"- {k}: {fmt(v)}\n" for k, v in metrics.items() if not isinstance(v, dict))
        return f"""A published classifier imported with its own heads (no medfm training).

## Model
- Encoder: `{enc.get("name", "?")}`; head: {head.get("type", "?")}
- Task: {config.get("task", "?")}; classes: {classes}
- Decision threshold: {_threshold(config)}

## Import checks
{checks or "none recorded"}
Evaluate it on your own data before use: `medfm audit RUN DATA --label NAME`.
`model(x)` gives logits (B, K); `model.predict_proba(x)` probabilities; `model.embed(x)` features.
"""
    return f"""An encoder adapted with labels by `medfm adapt` (method `{config.get("method") or "?"}`).

## Model
- Encoder: `{enc.get("name", "?")}` (embedding size {enc.get("embed_dim", "?")})
- Head: {head.get("type", "?")}
- Task: {config.get("task", "?")}; classes: {classes}
- Decision threshold: {_threshold(config)}
- Labels used: {_budget(config.get("budget"))}, seed {fmt(config.get("seed"))}

## Results (the adaptation run's test split)
{table}{check_line}
`model(x)` gives logits (B, K); `model.predict_proba(x)` probabilities; `model.embed(x)` features.
`medfm.tasks.adapt.classifier.predict_store(model, store)` predicts every case of a prepared dataset.
"""
