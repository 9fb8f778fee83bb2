"""Assemble audit.json from the audit's parts: one pure function, plus the one-line findings a reader sees
first. Nothing is computed here; every number comes from the modules that own it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from medfm.errors import ConfigError

SCHEMA = "medfm.audit/1"
SECTIONS = ("cross_site", "shift", "ood", "fairness", "calibration", "explanations", "shortcuts",
            "mitigation")
# Never written to audit.json, whatever a caller passes in: the audit leaves the hospital.
IDENTIFYING_KEYS = frozenset({"patient_id", "patient_name", "path", "source_path", "filename", "file",
                              "source", "accession_number", "study_uid"})


def to_jsonable(obj: Any) -> Any:
    """numpy / pandas / dataclass values -> plain JSON types; NaN and infinities -> None; identifying keys
    dropped."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items() if str(k) not in IDENTIFYING_KEYS}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj))
    if isinstance(obj, pd.DataFrame):
        return to_jsonable(obj.reset_index().to_dict(orient="records"))
    if isinstance(obj, pd.Series):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, list | tuple | set):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _fmt_ci(d: Mapping) -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return f"{f(d.get('value'))} [{f(d.get('lo'))}, {f(d.get('hi'))}]"


def summarize_findings(audit: Mapping) -> list[str]:
    """Plain-language flags: detected shifts, subgroup gaps whose CI excludes 0, predictable attributes,
    OOD rates well above the expected false-alarm rate, remaining miscalibration."""
    out: list[str] = []
    for pair, tests in (audit.get("shift") or {}).items():
        hits = [k for k, v in tests.items() if isinstance(v, Mapping) and v.get("detected")]
        if hits and tests.get("any_detected", True):  # any_detected is the multiplicity-corrected verdict
            out.append(f"shift {pair}: detected by {', '.join(sorted(hits))}")
    for attr, res in (audit.get("fairness") or {}).items():
        for row in res.get("groups", []):
            gap = (row.get("gap") or {}).get("fnr")
            if not gap or row.get("too_small") or gap["lo"] is None or gap["hi"] is None:
                continue
            if gap["lo"] > 0 or gap["hi"] < 0:
                word = "higher" if gap["lo"] > 0 else "lower"
                # "lower by" a positive amount: a negative gap's CI is flipped (and its ends swapped)
                size = gap if gap["lo"] > 0 else {"value": -gap["value"], "lo": -gap["hi"], "hi": -gap["lo"]}
                out.append(f"fairness {attr}={row['group']}: FNR {word} than {res['reference']} by "
                           f"{_fmt_ci(size)}")
        small = [r["group"] for r in res.get("groups", []) if r.get("too_small")]
        if small:
            out.append(f"fairness {attr}: {len(small)} group(s) under {res['min_size']} cases, not ranked")
    for attr, res in (audit.get("shortcuts") or {}).items():
        if res.get("predictable"):
            out.append(f"shortcut: {attr} predictable from embeddings, AUROC {_fmt_ci(res['auroc'])}")
    ood = audit.get("ood") or {}
    expected = 1 - ood.get("quantile", 0.95)
    for name, s in (ood.get("scores") or {}).items():
        if s.get("flagged_fraction", 0) > 2 * expected:
            out.append(f"ood {name}: {s['flagged_fraction']:.1%} of cases flagged (expected ~{expected:.0%})")
    cal = audit.get("calibration") or {}
    if cal.get("after", {}).get("ece") is not None and cal["after"]["ece"] > 0.1:
        out.append(f"calibration: ECE {cal['after']['ece']:.3f} even after temperature scaling")
    return out


def assemble_audit(model: Mapping | None = None, datasets: Mapping | None = None,
                   settings: Mapping | None = None, **sections: Any) -> dict:
    """The audit.json document: schema, model and dataset descriptions, settings, the sections given
    (keyword names from ``SECTIONS``), and the findings. Unknown section names raise."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown audit section(s) {unknown}; known: {list(SECTIONS)}")
    doc: dict = {"schema": SCHEMA, "model": dict(model or {}), "datasets": dict(datasets or {}),
                 "settings": dict(settings or {}),
                 "sections": [s for s in SECTIONS if sections.get(s) is not None]}
    for name in doc["sections"]:
        doc[name] = sections[name]
    doc = to_jsonable(doc)
    doc["findings"] = summarize_findings(doc)
    return doc
