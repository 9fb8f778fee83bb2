"""Model card section of audit runs (kind "audit", from ``medfm audit``): what was audited, on which data,
and the flags raised. The card's "Training data" header is the audited model's training data."""

from __future__ import annotations

from typing import Any

from medfm.modelcard.common import SECTIONS, fmt


@SECTIONS.register("audit")
def section(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Audited model, datasets, headline AUROCs and the number of findings (listed in audit.html)."""
    from pathlib import Path

    names = config.get("audited") or [Path(str(p)).name for p in config.get("datasets") or []]
    ds = ", ".join(f"`{n}`" + (" (reference)" if i == 0 else "") for i, n in enumerate(names)) or "–"
    rows = "\n".join(f"| {k.removeprefix('auroc_')} | {fmt(v)} |" for k, v in metrics.items()
                     if k.startswith("auroc_"))
    table = f"| dataset | AUROC |\n|---|---|\n{rows}\n" if rows else "no labelled dataset (monitor mode)\n"
    return f"""A trust audit (`medfm audit`) of the classifier `{Path(str(config.get("model", "?"))).name}`.

## Audited data
{ds}

## Headline
{table}
Findings raised: {fmt(metrics.get("n_findings"))}. Read `audit.html` (cross-site performance, shift, OOD,
fairness, calibration, explanations with sanity checks, shortcuts, mitigation); the numbers are in
`audit.json`.
"""
