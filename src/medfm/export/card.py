"""Model card section of exported models (kind "export", from ``medfm export``): files, input, parity
with PyTorch and the int8 deltas (test AUROC for classifiers, test Dice for segmenters)."""

from __future__ import annotations

from typing import Any

from medfm.modelcard.common import SECTIONS, fmt


def _mib(n: Any) -> str:
    return f"{n / 2**20:.2f} MiB" if isinstance(n, int | float) else "–"


def _dice(d: Any) -> str:
    return fmt(d.get("mean")) if isinstance(d, dict) else "–"


@SECTIONS.register("export")
def section(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Source run, input contract, one row per ONNX variant (size, max diff, test AUROC or Dice)."""
    variants = config.get("variants") or {}
    seg = config.get("source_kind") == "segmenter"
    rows = []
    for name, v in variants.items():
        if name == "torch":
            continue
        diffs = ", ".join(f"{k} {fmt(d)}" for k, d in (v.get("max_abs_diff") or {}).items())
        score = (f"{_dice(v.get('test_dice'))} ({_dice(v.get('test_dice_delta'))} vs PyTorch)" if seg
                 else fmt(v.get("test_auroc")))
        rows.append(f"| {name} | `{v.get('file')}` | {_mib(v.get('bytes'))} | vs {v.get('vs')}: {diffs} | "
                    f"{score} |")
    torch_v = variants.get("torch") or {}
    shape = ", ".join(map(str, config.get("input_shape") or []))
    classes = ", ".join(map(str, config.get("classes") or [])) or "–"
    inp = config.get("input") or {}
    if seg:
        inf = config.get("inference") or {}
        task = (f"Segmentation, {config.get('num_classes')} classes (background + {classes}); masks: "
                f"{inf.get('mask', 'argmax')}; inference {inf.get('mode')} (window "
                f"{inf.get('roi_size')}, overlap {inf.get('overlap')}).")
        score_name, ref = "test Dice (mean)", f"PyTorch test Dice per class: {torch_v.get('test_dice')}."
    else:
        task = f"Task {fmt(config.get('task'))}; classes {classes}; threshold {fmt(config.get('threshold'))}."
        score_name, ref = "test AUROC", f"PyTorch test AUROC: {fmt(torch_v.get('test_auroc'))}."
    return f"""ONNX export (`medfm export`) of the {config.get("source_kind")} run `{config.get("source")}`.

## Input and output
Input `image`: float32 (B, {shape}) ({inp.get("layout", "")}, batch dynamic): {inp.get("scale", "")},
{inp.get("channels", "")}, resized {inp.get("resize", "")}. Output: {config.get("output")}.
{task}

## Variants
| variant | file | size | max abs diff | {score_name} |
|---|---|---|---|---|
{chr(10).join(rows)}

{ref} fp32 must match PyTorch within {fmt(config.get("atol"))}; the
int8 rows are compared with fp32 on the same inputs (random, calibration images, test split).
Run one with `medfm.export.load_exported(folder, variant).run(x)` (onnxruntime, CPU).
"""
