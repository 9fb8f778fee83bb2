"""Free-text reports that say exactly what the phantom shows, in varied wording, plus a small negation-aware
labeler (`extract_labels`) that reads the labels back from report text (also handy to score generated
reports).

Each sentence is either about present findings or a negation of absent ones — never both — so a sentence-level
rule (mention + negation cue => negative) is exact on these reports.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from medfm.data.phantom.cohort import FINDINGS

# Patterns that mention each finding (positively or negated).
MENTIONS: dict[str, str] = {
    "nodule": r"nodul|rounded opacit",
    "effusion": r"effusion|pleural fluid|meniscus|blunting",
    "consolidation": r"consolidat|airspace (opacit|disease)|patchy opacit|infiltrate",
    "cardiomegaly": r"cardiomegaly|enlarged (cardiac|heart)|(heart|cardiac silhouette) is enlarged|"
    r"cardiac enlargement",
    "pneumothorax": r"pneumothora|pleural line",
}
NEGATION = r"\b(no|without|not|resolved|negative for|free of)\b"

_SIDE = {"right": ["right", "right-sided"], "left": ["left", "left-sided"], "bilateral": ["bilateral"]}


def _pick(r: np.random.Generator, options: list[str]) -> str:
    return options[int(r.integers(len(options)))]


def _side(r: np.random.Generator, side: str) -> str:
    return _pick(r, _SIDE[side])


def _positive(r: np.random.Generator, name: str, rec: dict[str, Any], kind: str) -> str:
    zone = "zone" if kind == "cxr" else "lobe"
    if name == "nodule":
        size, side, z = rec["nodule_size_mm"], rec["nodule_side"], rec["nodule_zone"]
        where = f"{side} {z} {zone}" if kind == "cxr" else rec["nodule_lobe"]
        return _pick(
            r,
            [
                f"There is a {size:.0f} mm nodule in the {where}.",
                f"A {size:.0f} mm well-circumscribed pulmonary nodule projects over the {where}.",
                f"Rounded opacity in the {where} measuring {size:.0f} mm, consistent with a nodule.",
                f"{size:.0f} mm nodular opacity in the {where}.",
            ],
        )
    if name == "effusion":
        side, size = rec["effusion_side"], rec["effusion_size"]
        s = _side(r, side)
        if kind == "ct":
            return _pick(
                r,
                [
                    f"{size.capitalize()} {s} dependent pleural effusion.",
                    f"There is a {size} {s} pleural effusion layering posteriorly.",
                ],
            )
        return _pick(
            r,
            [
                f"{size.capitalize()} {s} pleural effusion.",
                f"There is a {size} {s} pleural effusion with a meniscus at the costophrenic angle.",
                f"Blunting of the {s} costophrenic angle with a meniscus, in keeping with a {size} effusion.",
                f"{size.capitalize()} {s} pleural fluid collection.",
            ],
        )
    if name == "consolidation":
        side, z, lobe = rec["consolidation_side"], rec["consolidation_zone"], rec["consolidation_lobe"]
        where = f"{side} {z} {zone}" if kind == "cxr" else lobe
        return _pick(
            r,
            [
                f"Patchy consolidation in the {where}.",
                f"There is airspace opacity in the {where}, compatible with consolidation.",
                f"Focal airspace consolidation is seen in the {where}.",
                f"Patchy opacity in the {where} consistent with airspace disease.",
            ],
        )
    if name == "cardiomegaly":
        ctr = rec["ctr"]
        return _pick(
            r,
            [
                f"Cardiomegaly with a cardiothoracic ratio of {ctr:.2f}.",
                "The heart is enlarged.",
                f"Enlarged cardiac silhouette (cardiothoracic ratio {ctr:.2f}).",
                "There is cardiac enlargement.",
            ],
        )
    if name == "pneumothorax":
        side, size = rec["pneumothorax_side"], rec["pneumothorax_size"]
        s = _side(r, side)
        if kind == "ct":
            return _pick(
                r,
                [f"{size.capitalize()} {s} pneumothorax anteriorly.", f"There is a {size} {s} pneumothorax."],
            )
        return _pick(
            r,
            [
                f"{size.capitalize()} {s} apical pneumothorax.",
                f"There is a {size} {s} pneumothorax with a visible pleural line and a lucent periphery "
                "devoid of lung markings.",
                f"Visceral pleural line in the {s} hemithorax, consistent with a {size} pneumothorax.",
            ],
        )
    raise KeyError(name)


_NEGATIVE = {
    "nodule": ["No pulmonary nodule.", "No suspicious pulmonary nodule is seen.", "No nodules or masses."],
    "effusion": ["No pleural effusion.", "There is no pleural effusion.", "No evidence of pleural effusion."],
    "consolidation": ["No focal consolidation.", "There is no consolidation.", "No airspace consolidation."],
    "cardiomegaly": [
        "Heart size is normal.",
        "The cardiac silhouette is within normal limits.",
        "Normal heart size.",
    ],
    "pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."],
}
_RESOLVED = {
    "effusion": "No pleural effusion; the previously seen effusion has resolved.",
    "consolidation": "The previously seen consolidation has resolved.",
    "pneumothorax": "The previously seen pneumothorax has resolved.",
}
_IMPRESSION_NAMES = {
    "nodule": ["pulmonary nodule", "nodule"],
    "effusion": ["pleural effusion", "effusion"],
    "consolidation": ["consolidation", "airspace consolidation"],
    "cardiomegaly": ["cardiomegaly"],
    "pneumothorax": ["pneumothorax"],
}


def make_report(rec: dict[str, Any], r: np.random.Generator, kind: str = "cxr") -> str:
    """FINDINGS + IMPRESSION text for a planned case record."""
    present = [n for n in FINDINGS if rec[n]]
    prior = rec.get("_prior")
    order = list(present)
    r.shuffle(order)
    sentences: list[str] = []
    if kind == "ct":
        sentences.append(_pick(r, ["CT of the chest without contrast.", "Axial CT images of the thorax."]))
    if prior is not None:
        sentences.append(
            _pick(r, ["Comparison is made with the prior study.", "Compared with the prior exam."])
        )
    for n in order:
        s = _positive(r, n, rec, kind)
        if n == "nodule" and rec.get("_prior_nodule_mm"):
            old = rec["_prior_nodule_mm"]
            if rec["nodule_size_mm"] - old >= 1.0:
                s += f" The nodule has increased in size from {old:.0f} mm."
            else:
                s += " The nodule is stable in size."
        elif prior is not None and prior.get(n) == 0 and n != "cardiomegaly":
            s += _pick(r, [" This is new.", " New since the prior study."])
        sentences.append(s)
    absent = [n for n in FINDINGS if not rec[n]]
    lungs_clear = not any(rec[n] for n in ("nodule", "consolidation", "effusion", "pneumothorax"))
    if lungs_clear and r.random() < 0.5:
        sentences.append(_pick(r, ["The lungs are clear.", "Lungs are well expanded and clear."]))
    for n in absent:
        if prior is not None and prior.get(n) and n in _RESOLVED:
            sentences.append(_RESOLVED[n])
        elif r.random() < 0.55:  # radiologists mention only some negatives
            sentences.append(_pick(r, _NEGATIVE[n]))
    if kind == "cxr" and r.random() < 0.5:
        sentences.append(_pick(r, ["No acute osseous abnormality.", "The visualised bones are intact."]))

    if not present:
        impression = _pick(
            r,
            [
                "No acute cardiopulmonary abnormality.",
                "Normal chest radiograph." if kind == "cxr" else "Normal CT of the chest.",
                "No acute disease.",
            ],
        )
    else:
        parts = []
        for n in present:
            name = _pick(r, _IMPRESSION_NAMES[n])
            side = rec.get(f"{n}_side", "")
            parts.append(f"{side.capitalize()} {name}." if side else f"{name.capitalize()}.")
        if rec["nodule"]:
            parts.append(
                _pick(r, ["Recommend CT follow-up of the nodule.", "Follow-up of the nodule advised."])
            )
        impression = " ".join(f"{i + 1}. {p}" for i, p in enumerate(parts))
    return "FINDINGS: " + " ".join(sentences) + "\nIMPRESSION: " + impression


def split_sentences(text: str) -> list[str]:
    text = re.sub(r"\b\d+\.\s", " ", text)  # drop list numbers "1. "
    return [s for s in re.split(r"(?<=[.!?])\s+|\n", text) if s.strip()]


def extract_labels(text: str) -> dict[str, int]:
    """Finding -> 1 if some sentence mentions it without a negation cue, else 0."""
    out = dict.fromkeys(FINDINGS, 0)
    for sent in split_sentences(text.lower()):
        negated = re.search(NEGATION, sent) is not None
        for name, pat in MENTIONS.items():
            if not negated and re.search(pat, sent):
                out[name] = 1
    return out
