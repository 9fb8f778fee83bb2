"""Retrieval-augmented reports: find the k most similar training cases, vote per finding, and compose a
report from the neighbours' own sentences, citing their case ids as evidence.

Why compose instead of copying the nearest report: the nearest case rarely has exactly the query's set of
findings; a similarity-weighted vote per finding over k neighbours is much more often right, and every
sentence of the result is a real radiologist sentence that can be traced to a cited case.
"""

from __future__ import annotations

import math
import re
from typing import Any

from medfm.eval.text_metrics import NEGATIVE, POSITIVE, label_report, split_sentences
from medfm.tasks.vlm.prompts import SYNONYMS


def _sections(report: str) -> tuple[str, str]:
    m = re.search(r"impression\s*:", report, flags=re.I)
    if not m:
        return report, ""
    findings = re.sub(r"^\s*findings\s*:\s*", "", report[: m.start()], flags=re.I)
    return findings.strip(), report[m.end() :].strip()


def _impression_items(impression: str) -> list[str]:
    items = [s.strip() for s in re.split(r"(?:^|\s)\d+\.\s", impression) if s.strip()]
    return [s if s.endswith(".") else s + "." for s in items]


def compose_report(neighbours: list[dict[str, Any]], sharpness: float = 10.0) -> dict[str, Any]:
    """Compose FINDINGS / IMPRESSION from neighbours ``[{"case_id", "report", "similarity"}, ...]``
    (most similar first). Returns the report, the per-finding vote (share of weight saying "present") and
    the evidence (cited case ids)."""
    if not neighbours:
        return {"report": "", "votes": {}, "evidence": []}
    w = [math.exp(sharpness * float(n["similarity"])) for n in neighbours]
    total = sum(w)
    labels = [label_report(n["report"]) for n in neighbours]
    mentioned = sorted({f for lab in labels for f in lab})
    votes = {f: sum(wi for wi, lab in zip(w, labels) if lab.get(f) == POSITIVE) / total for f in mentioned}
    present = [f for f in mentioned if votes[f] > 0.5]
    absent = [f for f in mentioned if votes[f] <= 0.5]

    sentences: list[str] = []
    cited: list[str] = []

    def pick(f: str, want: str) -> None:
        for n, _lab in zip(neighbours, labels):
            body, _ = _sections(n["report"])
            for s in split_sentences(body):
                lab_s = label_report(s)
                if lab_s.get(f) != want:
                    continue
                # A sentence may not smuggle in a finding the vote decided the other way.
                if any(lab_s.get(g) == POSITIVE for g in absent) or any(
                    lab_s.get(g) == NEGATIVE for g in present
                ):
                    continue
                if s not in sentences:
                    sentences.append(s)
                if n["case_id"] not in cited:
                    cited.append(n["case_id"])
                return

    for f in present:
        pick(f, POSITIVE)
    for f in absent:
        if any(lab.get(f) == NEGATIVE for lab in labels):
            pick(f, NEGATIVE)
    items: list[str] = []
    for f in present:
        found = None
        for n in neighbours:
            for it in _impression_items(_sections(n["report"])[1]):
                if label_report(it).get(f) == POSITIVE and not any(
                    label_report(it).get(g) == POSITIVE for g in absent
                ):
                    found = it
                    break
            if found:
                break
        name = SYNONYMS.get(f, [f])[0]
        items.append(found or f"{name[:1].upper()}{name[1:]}.")
    impression = (
        " ".join(f"{i + 1}. {t}" for i, t in enumerate(dict.fromkeys(items)))
        if items
        else "No acute cardiopulmonary abnormality."
    )
    report = f"FINDINGS: {' '.join(sentences) or 'No acute abnormality.'}\nIMPRESSION: {impression}"
    evidence = [
        {
            "case_id": n["case_id"],
            "similarity": round(float(n["similarity"]), 4),
            "positive_findings": sorted(f for f, v in lab.items() if v == POSITIVE),
        }
        for n, lab in zip(neighbours, labels)
    ]
    return {
        "report": report,
        "votes": {f: round(v, 3) for f, v in votes.items()},
        "evidence": evidence,
        "cited": cited or [neighbours[0]["case_id"]],
    }


def neighbours_of(
    index: Any, query_emb: Any, k: int, modality: str = "text", exclude: set[str] | None = None
) -> list[list[dict[str, Any]]]:
    """Nearest indexed cases for each query embedding (excluding ``exclude`` case ids, e.g. the query's own
    patient when evaluating on the indexed set)."""
    extra = len(exclude) if exclude else 0
    sims, idx = index.search(query_emb, k + extra, modality)
    out = []
    for srow, irow in zip(sims, idx):
        hits = []
        for s, i in zip(srow, irow):
            if i < 0:
                continue
            c = index.cases[int(i)]
            if exclude and c["case_id"] in exclude:
                continue
            hits.append({**c, "similarity": float(s)})
            if len(hits) == k:
                break
        out.append(hits)
    return out


def rag_reports(index: Any, query_emb: Any, k: int = 5, modality: str = "text") -> list[dict[str, Any]]:
    """One composed report (with votes and evidence) per query image embedding."""
    return [compose_report(nb) for nb in neighbours_of(index, query_emb, k, modality)]


def nearest_reports(index: Any, query_emb: Any, modality: str = "text") -> list[dict[str, Any]]:
    """Plain retrieval baseline: the single most similar case's report, verbatim."""
    return [
        {"report": nb[0]["report"], "cited": [nb[0]["case_id"]]}
        for nb in neighbours_of(index, query_emb, 1, modality)
    ]
