"""The agent's tools: pure functions of (Engine, StudySource, arguments) -> JSON-able dict.

Each result has a ``provenance`` record ``{id, tool, model, inputs, time}``: ``model`` is ``{name, hash}``
(or a list of them; empty for tools that run no model), ``inputs`` the study / patient refs and the
engine's input ids the result was computed from, ``id`` what a read cites. No result holds a patient name or
id, a birth date, an accession number, a file name or a path: :func:`leaks` checks that recursively.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np

from medfm.agent.studies import StudySource
from medfm.serve.engine import Engine

TOOL_NAMES = ("list_studies", "get_priors", "classify", "segment", "zero_shot_findings", "similar_cases",
              "draft_report", "explain", "compare_with_prior")
PROB_THRESHOLD = 0.05  # a finding's probability must move by more than this to count as a change
AREA_THRESHOLD = 0.02  # a segment's area fraction likewise


class ToolFailure(Exception):
    """A tool call that cannot be answered (unknown study, capability not served); one-line message."""


def _provenance(tool: str, models: Iterable[dict[str, Any]], inputs: Iterable[str]) -> dict[str, Any]:
    ms = [{"name": m["name"], "hash": m["hash"]} for m in models]
    return {"id": f"{tool}:{secrets.token_hex(4)}", "tool": tool, "model": ms[0] if len(ms) == 1 else ms,
            "inputs": list(dict.fromkeys(inputs)), "time": datetime.now(UTC).isoformat(timespec="seconds")}


def _capable(engine: Engine, capability: str) -> None:
    caps = {c for d in engine.describe() for c in d["capabilities"]}
    if capability not in caps:
        raise ToolFailure(f"no served model can {capability.replace('_', ' ')} (serving: "
                          f"{', '.join(sorted(caps)) or 'nothing'})")


def _run(engine: Engine, source: StudySource, study: str, capability: str, fn: str, **kw: Any) -> Any:
    """The engine's ``fn`` on the study's first image (checking that some model has ``capability``)."""
    _capable(engine, capability)
    source.study(study)
    return getattr(engine, fn)(source.fetch(study), **kw)


def list_studies(engine: Engine, source: StudySource) -> dict[str, Any]:
    rows = source.list_studies()
    return {"studies": rows, "provenance": _provenance("list_studies", [], [r["study"] for r in rows])}


def get_priors(engine: Engine, source: StudySource, patient: str,
               before_study: str | None = None) -> dict[str, Any]:
    rows = source.priors(patient, before_study)
    return {"patient": patient, "priors": rows,
            "provenance": _provenance("get_priors", [], [patient, *([before_study] if before_study else [])])}


def classify(engine: Engine, source: StudySource, study: str) -> dict[str, Any]:
    r = _run(engine, source, study, "classify", "classify")
    out: dict[str, Any] = {"study": study, "findings": r["findings"]}
    models = [r["model"]]
    if engine.ood_refs:  # how far the image is from the data the classifier was checked on
        o = engine.ood(source.fetch(study))
        out["ood"] = {k: o[k] for k in ("score", "threshold", "out_of_distribution")}
        models += [o["model"]] if o["model"] != r["model"] else []
    return out | {"provenance": _provenance("classify", models, [study, r["input"]])}


def segment(engine: Engine, source: StudySource, study: str) -> dict[str, Any]:
    r, _ = _run(engine, source, study, "segment", "segment")
    areas = {n: r["areas"].get(f"fraction_{n}") for n in r["segments"]}
    return {"study": study, "segments": r["segments"], "area_fraction": areas,
            "provenance": _provenance("segment", [r["model"]], [study, r["input"]])}


def zero_shot_findings(engine: Engine, source: StudySource, study: str,
                       findings: list[str] | None = None) -> dict[str, Any]:
    r = _run(engine, source, study, "zero_shot", "zero_shot", findings=findings or None)
    return {"study": study, "findings": r["findings"],
            "provenance": _provenance("zero_shot_findings", [r["model"]], [study, r["input"]])}


def similar_cases(engine: Engine, source: StudySource, study: str, k: int = 5) -> dict[str, Any]:
    _need_index(engine)
    r = _run(engine, source, study, "similar", "similar", k=_k(k))
    return {"study": study, "cases": r["cases"],
            "provenance": _provenance("similar_cases", [r["model"]], [study, r["input"]])}


def draft_report(engine: Engine, source: StudySource, study: str, k: int = 5) -> dict[str, Any]:
    _need_index(engine)
    r = _run(engine, source, study, "report", "report", k=_k(k))
    return {"study": study, "report": r["report"], "cited_cases": r["cited"], "evidence": r["evidence"],
            "provenance": _provenance("draft_report", [r["model"]], [study, r["input"]])}


def explain(engine: Engine, source: StudySource, study: str) -> dict[str, Any]:
    """Summary statistics of the saliency map (never the map itself)."""
    r, sal = _run(engine, source, study, "explain", "explain")
    sal = np.asarray(sal, np.float64)
    flat = sal[sal.shape[0] // 2] if sal.ndim == 3 else sal  # a volume: its middle slice
    h, w = flat.shape
    total = float(flat.sum()) or 1.0  # an all-zero map: every share below is 0
    iy, ix = np.unravel_index(int(np.argmax(flat)), flat.shape)
    yy, xx = np.mgrid[0:h, 0:w]
    top = np.sort(flat.ravel())[::-1][: max(1, flat.size // 10)]
    out: dict[str, Any] = {
        "study": study, "method": r["method"],
        "peak": {"row": round((iy + 0.5) / h, 3), "col": round((ix + 0.5) / w, 3)},
        "centroid": {"row": round((float((flat * yy).sum()) / total + 0.5) / h, 3),
                     "col": round((float((flat * xx).sum()) / total + 0.5) / w, 3)},
        "top_decile_share": round(float(top.sum()) / total, 3),
        "note": "row/col: fractions of the image height/width from the top-left corner; shares: of the "
                "total saliency",
    }
    models = [r["model"]]
    caps = {c for d in engine.describe() for c in d["capabilities"]}
    if "segment" in caps:
        seg, mask = engine.segment(source.fetch(study))
        mask = np.asarray(mask)
        mask = mask[mask.shape[0] // 2] if mask.ndim == 3 else mask
        if mask.shape != flat.shape:  # nearest-neighbour onto the saliency grid
            ry = (np.arange(h) * mask.shape[0] // h)[:, None]
            rx = (np.arange(w) * mask.shape[1] // w)[None, :]
            mask = mask[ry, rx]
        inside = mask > 0
        out["mask_area_fraction"] = round(float(inside.mean()), 3)
        out["share_inside_mask"] = round(float(flat[inside].sum()) / total, 3)
        models.append(seg["model"])
    return out | {"provenance": _provenance("explain", models, [study, r["input"]])}


def _change(now: float | None, before: float | None, threshold: float) -> dict[str, Any]:
    if now is None or before is None:
        return {"current": now, "prior": before, "delta": None, "change": "unknown"}
    d = round(now - before, 6)
    return {"current": now, "prior": before, "delta": d,
            "change": "increased" if d > threshold else "decreased" if d < -threshold else "stable"}


def compare_with_prior(engine: Engine, source: StudySource, study: str, prior: str,
                       threshold: float = PROB_THRESHOLD,
                       area_threshold: float = AREA_THRESHOLD) -> dict[str, Any]:
    """Per finding (probability) and per segment (area fraction): current, prior, delta and a label."""
    cur, old = source.study(study), source.study(prior)
    if cur["patient"] != old["patient"]:
        raise ToolFailure(f"study {prior!r} is not a study of the same patient as {study!r}")
    if study == prior:
        raise ToolFailure("compare_with_prior needs two different studies")
    caps = {c for d in engine.describe() for c in d["capabilities"]}
    fn = "classify" if "classify" in caps else "zero_shot" if "zero_shot" in caps else None
    if fn is None and "segment" not in caps:
        raise ToolFailure("no served model can classify, zero-shot or segment")
    out: dict[str, Any] = {"study": study, "prior": prior,
                           "dates": {"current": cur["date"], "prior": old["date"]},
                           "thresholds": {"probability": threshold, "area_fraction": area_threshold}}
    models: list[dict[str, Any]] = []
    inputs = [study, prior]
    if fn is not None:
        a, b = (getattr(engine, fn)(source.fetch(s)) for s in (study, prior))
        pb = {f["name"]: f["probability"] for f in b["findings"]}
        out["findings"] = [{"name": f["name"], **_change(f["probability"], pb.get(f["name"]), threshold)}
                           for f in a["findings"]]
        models.append(a["model"])
        inputs += [a["input"], b["input"]]
    if "segment" in caps:
        (a, _), (b, _) = (engine.segment(source.fetch(s)) for s in (study, prior))
        out["segments"] = [{"name": n, **_change(a["areas"].get(f"fraction_{n}"),
                                                 b["areas"].get(f"fraction_{n}"), area_threshold)}
                           for n in a["segments"]]
        models.append(a["model"])
        inputs += [a["input"], b["input"]]
    return out | {"provenance": _provenance("compare_with_prior", models, inputs)}


def _need_index(engine: Engine) -> None:
    if engine.index is None:
        raise ToolFailure("no case index is served (start with --index PAIRS)")


def _k(k: int) -> int:
    if not 1 <= int(k) <= 50:
        raise ToolFailure(f"k must be between 1 and 50, got {k}")
    return int(k)


def call(engine: Engine, source: StudySource, tool: str,
         args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one tool by name (what the server and a direct plan do)."""
    if tool not in TOOL_NAMES:
        raise ToolFailure(f"no tool {tool!r}; tools: {', '.join(TOOL_NAMES)}")
    return globals()[tool](engine, source, **(args or {}))


def leaks(obj: Any, forbidden: Iterable[str], where: str = "$") -> list[str]:
    """Where (JSON paths) any ``forbidden`` string occurs, case-insensitively, in obj's keys or values."""
    needles = [f.lower() for f in forbidden if f]
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if any(n in str(k).lower() for n in needles):
                found.append(f"{where}.{k} (key)")
            found += leaks(v, needles, f"{where}.{k}")
    elif isinstance(obj, list | tuple | set):
        for i, v in enumerate(obj):
            found += leaks(v, needles, f"{where}[{i}]")
    elif obj is not None and any(n in str(obj).lower() for n in needles):
        found.append(where)
    return found
