"""Class prompts for zero-shot classification: per finding, several positive and negative phrasings.

A finding's score is a softmax between its positive and its negative prompt ensembles (the mean of the
L2-normalised template embeddings), so "pleural effusion" is judged against "no pleural effusion" rather than
against the other findings — which is what makes the scores usable for multi-label data.

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


def load_prompts(spec: str | Path | None, findings: list[str] | None = None) -> Prompts:
    """``default`` / None -> default_prompts(findings); otherwise read a JSON prompts file."""
    if spec is None or str(spec) == "default":
        return default_prompts(findings)
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
