"""Model card section of exported models (kind "export", from ``medfm export``): files, input, parity
with PyTorch and the int8 deltas."""

from __future__ import annotations

from typing import Any

from medfm.modelcard.common import SECTIONS, fmt


def _mib(n: Any) -> str:
    return f"{n / 2**20:.2f} MiB" if isinstance(n, int | float) else "–"


@SECTIONS.register("export")
def section(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Source run, input contract, one row per ONNX variant (size, max diff, test AUROC)."""
    variants = config.get("variants") or {}
    rows = []
    for name, v in variants.items():
        if name == "torch":
            continue
        diffs = ", ".join(f"{k} {fmt(d)}" for k, d in (v.get("max_abs_diff") or {}).items())
        rows.append(f"| {name} | `{v.get('file')}` | {_mib(v.get('bytes'))} | vs {v.get('vs')}: {diffs} | "
                    f"{fmt(v.get('test_auroc'))} |")
    torch_auc = (variants.get("torch") or {}).get("test_auroc")
    shape = ", ".join(map(str, config.get("input_shape") or []))
    classes = ", ".join(map(str, config.get("classes") or [])) or "–"
    inp = config.get("input") or {}
    return f"""ONNX export (`medfm export`) of the {config.get("source_kind")} run `{config.get("source")}`.

## Input and output
Input `image`: float32 (B, {shape}) ({inp.get("layout", "")}, batch dynamic): {inp.get("scale", "")},
{inp.get("channels", "")}, resized {inp.get("resize", "")}. Output: {config.get("output")}.
Task {fmt(config.get("task"))}; classes {classes}; threshold {fmt(config.get("threshold"))}.

## Variants
| variant | file | size | max abs diff | test AUROC |
|---|---|---|---|---|
{chr(10).join(rows)}

PyTorch test AUROC: {fmt(torch_auc)}. fp32 must match PyTorch within {fmt(config.get("atol"))}; the
int8 rows are compared with fp32 on the same inputs (random, calibration images, test split).
Run one with `medfm.export.load_exported(folder, variant).run(x)` (onnxruntime, CPU).
"""
