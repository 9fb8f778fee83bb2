"""Class prompts for zero-shot classification: per finding, several positive and negative phrasings.

A finding's score is a softmax between its positive and its negative prompt ensembles (the mean of the
L2-normalised template embeddings), so "pleural effusion" is judged against "no pleural effusion" rather than
against the other findings — which is what makes the scores usable for multi-label data.

Two built-in sets: ``default`` (bare names in short templates) and ``attributes`` (report-style sentences that
name the side, size or zone: "There is a small right pneumothorax."). Which works better depends on how the
training reports were written, so :func:`select_prompts` picks per finding the set with the best AUROC on a
labelled validation split — the test split is never used for the choice.

A prompts file is JSON: ``{"effusion": {"positive": ["pleural effusion", ...], "negative": ["no pleural
effusion", ...]}, ...}``; or ``{"effusion": ["pleural effusion", "pleural fluid"]}`` (names only: the
templates below make the sentences).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medfm.errors import InputError

Prompts = dict[str, dict[str, list[str]]]

POSITIVE_TEMPLATES = ["{}.", "There is {}.", "Findings consistent with {}.", "{} is seen."]
NEGATIVE_TEMPLATES = ["No {}.", "There is no {}.", "No evidence of {}.", "Without {}."]

# Names of each finding as radiologists write them; the first is the canonical one.
SYNONYMS: dict[str, list[str]] = {
    "nodule": ["pulmonary nodule", "nodule", "nodular opacity"],
    "effusion": ["pleural effusion", "effusion", "pleural fluid"],
    "consolidation": ["consolidation", "airspace consolidation", "airspace opacity"],
    "cardiomegaly": ["cardiomegaly", "enlarged heart", "cardiac enlargement"],
    "pneumothorax": ["pneumothorax", "apical pneumothorax"],
    "edema": ["pulmonary edema", "edema"],
    "atelectasis": ["atelectasis"],
    "pneumonia": ["pneumonia"],
}
# Negatives that are not "no <name>": normal phrasings radiologists use instead.
EXTRA_NEGATIVES: dict[str, list[str]] = {
    "cardiomegaly": [
        "Heart size is normal.",
        "Normal heart size.",
        "The cardiac silhouette is within normal limits.",
    ],
    "consolidation": ["The lungs are clear."],
}


def from_names(names: list[str], extra_negative: list[str] | None = None) -> dict[str, list[str]]:
    def cap(s: str) -> str:
        return s[:1].upper() + s[1:]

    pos = [cap(t.format(n)) for n in names for t in POSITIVE_TEMPLATES]
    neg = [cap(t.format(n)) for n in names for t in NEGATIVE_TEMPLATES] + list(extra_negative or [])
    return {"positive": pos, "negative": neg}


def default_prompts(findings: list[str] | None = None) -> Prompts:
    """Prompt ensembles for the given findings (names without synonyms are used as written)."""
    findings = findings or ["nodule", "effusion", "consolidation", "cardiomegaly", "pneumothorax"]
    return {f: from_names(SYNONYMS.get(f, [f.replace("_", " ")]), EXTRA_NEGATIVES.get(f)) for f in findings}


_SIZES = ("small", "moderate", "large")
_SIDES = ("right", "left")
_ZONES = ("upper", "mid", "lower")
# Report-style positives with the attributes radiologists state; findings not listed keep the default set.
ATTRIBUTE_POSITIVES: dict[str, list[str]] = {
    "pneumothorax": [f"There is a {z} {s} pneumothorax." for z in _SIZES for s in _SIDES],
    "effusion": [f"There is a {z} {s} pleural effusion." for z in _SIZES for s in _SIDES],
    "nodule": [f"There is a {mm} mm nodule in the {s} {z} zone." for mm in (5, 8, 12)
               for s in _SIDES for z in _ZONES],
    "consolidation": [f"There is consolidation in the {s} {z} zone." for s in _SIDES for z in _ZONES],
}


def attribute_prompts(findings: list[str] | None = None) -> Prompts:
    """:func:`default_prompts` with lateralised / sized report sentences as the positives where known."""
    out = default_prompts(findings)
    for f in out:
        if f in ATTRIBUTE_POSITIVES:
            # Negatives in report style too: the canonical name in the three ways reports deny a finding
            # (no "Without X." and no synonyms). The negative ensemble moves zero-shot scores as much as the
            # positive one: for a sentence-pooled tower, a negative set unlike report sentences pulls the
            # "absent" anchor away from the reports that state the finding absent.
            name = SYNONYMS[f][0]
            neg = [t.format(name) for t in NEGATIVE_TEMPLATES[:3]] + EXTRA_NEGATIVES.get(f, [])
            out[f] = {"positive": list(ATTRIBUTE_POSITIVES[f]), "negative": neg}
    return out


def corpus_prompts(reports: list[str], findings: list[str] | None = None, max_per_side: int = 256) -> Prompts:
    """Prompt ensembles in the archive's own wording: per finding, the report sentences that the
    negation-aware labeller (:mod:`medfm.eval.text_metrics`) reads as stating it present (positives) or
    absent (negatives), the most frequent first. Only sentences about that one finding are used, so an
    anchor is not pulled towards another finding. Needs no image labels — only the training reports — so
    the scores stay zero-shot. Findings without both kinds of sentence keep :func:`default_prompts`.
    """
    from collections import Counter

    from medfm.eval.text_metrics import FINDING_PATTERNS, NEGATIVE, POSITIVE, label_report, split_sentences

    out = default_prompts(findings)
    # Archives repeat sentences a lot: count them first, then label each distinct sentence once.
    freq = Counter(sent.strip() for report in reports for sent in split_sentences(report))
    known = list(FINDING_PATTERNS)  # every known finding, so a sentence about two of them is left out
    counts: dict[tuple[str, str], Counter[str]] = {}
    for sent, n in freq.items():
        labels = label_report(sent, known)
        if len(labels) == 1:
            (f, lab), = labels.items()
            if f in out and lab in (POSITIVE, NEGATIVE):
                counts.setdefault((f, lab), Counter())[sent] += n

    def top(c: Counter[str]) -> list[str]:
        return [t for t, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:max_per_side]]

    for f in out:
        pos, neg = counts.get((f, POSITIVE)), counts.get((f, NEGATIVE))
        if pos and neg:
            out[f] = {"positive": top(pos), "negative": top(neg)}
    return out


def select_prompts(candidates: dict[str, Prompts], scores: dict[str, dict[str, float | None]]
                   ) -> tuple[Prompts, dict[str, str]]:
    """Per finding, the candidate set with the highest score (e.g. validation AUROC).

    ``candidates``: set name -> prompts; ``scores``: set name -> finding -> score (None = not measurable).
    Ties and unmeasurable findings go to the first candidate. Returns (prompts, finding -> chosen set name).
    """
    names = list(candidates)
    if not names:
        raise ValueError("select_prompts needs at least one candidate prompt set")
    chosen_prompts: Prompts = {}
    chosen: dict[str, str] = {}
    for f in candidates[names[0]]:
        best, best_score = names[0], scores.get(names[0], {}).get(f)
        for n in names[1:]:
            sc = scores.get(n, {}).get(f)
            if f in candidates[n] and sc is not None and (best_score is None or sc > best_score):
                best, best_score = n, sc
        chosen_prompts[f], chosen[f] = candidates[best][f], best
    return chosen_prompts, chosen


def load_prompts(
    spec: str | Path | None, findings: list[str] | None = None, reports: list[str] | None = None
) -> Prompts:
    """``default`` / None -> default_prompts(findings); ``attributes`` -> attribute_prompts(findings);
    ``reports`` -> corpus_prompts(reports, findings) (pass the training reports); otherwise read a JSON
    prompts file."""
    if spec is None or str(spec) == "default":
        return default_prompts(findings)
    if str(spec) == "attributes":
        return attribute_prompts(findings)
    if str(spec) == "reports":
        if not reports:
            raise InputError(None, "prompts 'reports' need report text to mine; none was found")
        return corpus_prompts(reports, findings)
    p = Path(spec)
    try:
        raw: Any = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(p, "prompts file not found (give 'default' or a JSON file)") from None
    except json.JSONDecodeError as e:
        raise InputError(p, f"invalid JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise InputError(p, "prompts must be a JSON object {finding: {positive: [...], negative: [...]}}")
    out: Prompts = {}
    for k, v in raw.items():
        if isinstance(v, list) and v and all(isinstance(s, str) for s in v):
            out[k] = from_names(v, EXTRA_NEGATIVES.get(k))
        elif isinstance(v, dict) and all(
            isinstance(v.get(s), list) and v[s] for s in ("positive", "negative")
        ):
            out[k] = {
                "positive": [str(s) for s in v["positive"]],
                "negative": [str(s) for s in v["negative"]],
            }
        else:
            raise InputError(
                p, f"entry '{k}' needs non-empty 'positive' and 'negative' lists (or a list of names)"
            )
    return out
