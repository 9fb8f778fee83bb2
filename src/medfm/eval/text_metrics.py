"""Report metrics: BLEU-1..4 and ROUGE-L (torchmetrics), and clinical correctness from a small rule-based,
negation-aware finding labeller.

The labeller (NegEx-like) splits a report into sentences and clauses, finds finding mentions from keyword /
synonym lists, and calls a mention negative when a negation cue ("no", "without", "free of", "negative for",
...) precedes it in the same clause or a post-negation cue ("has resolved", "is normal", "within normal
limits", ...) follows it; hedges ("possible", "cannot be excluded") make it uncertain. Clinical precision /
recall / F1 compare the findings called *positive* in a generated report with those of the reference — the
number that says whether a report is right, which n-gram overlap does not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

POSITIVE, NEGATIVE, UNCERTAIN = "positive", "negative", "uncertain"

# Finding -> pattern of mentions that name the abnormality itself.
FINDING_PATTERNS: dict[str, str] = {
    "nodule": r"nodul\w*|rounded opacit\w*|(pulmonary|lung) mass(es)?|\bmass(es)?\b",
    "effusion": r"effusions?|pleural fluid|meniscus|blunting",
    "consolidation": r"consolidat\w*|airspace (opacit\w*|disease)|patchy opacit\w*|infiltrat\w*",
    "cardiomegaly": r"cardiomegaly|enlarged (cardiac|heart)( silhouette)?|"
    r"(heart|cardiac silhouette) is enlarged|"
    r"cardiac enlargement|enlargement of the (heart|cardiac silhouette)",
    "pneumothorax": r"pneumothora\w*|pleural line",
    "edema": r"edema|oedema|vascular congestion|interstitial (prominence|markings)",
    "atelectasis": r"atelecta\w*|volume loss",
    "pneumonia": r"pneumonia",
    "emphysema": r"emphysema\w*|hyperinflat\w*|hyperexpan\w*",
    "fracture": r"fractur\w*",
}
# Neutral anatomy: positive only with an abnormality qualifier, negative with a normality cue.
ANATOMY_PATTERNS: dict[str, str] = {
    "cardiomegaly": r"heart size|cardiac silhouette|cardiomediastinal silhouette|heart",
}
ABNORMAL_QUALIFIER = r"\b(enlarg\w*|increased|prominent|large|mildly enlarged)\b"
# Before a neutral anatomy mention, these deny the abnormality: "Normal heart size."
NORMAL_PRE = r"\b(normal|unremarkable)\b"
NEGATION_PRE = (
    r"\b(no|not|without|free of|negative for|absence of|clear of|no evidence of|no signs? of|"
    r"rule[sd]? out|resolution of|resolved)\b"
)
NEGATION_POST = (
    r"\b(ha(s|ve) resolved|resolved|(is|are) (now )?(normal|clear)|within normal limits|"
    r"(is|are) not (seen|identified|present)|absent|unremarkable|normal in size|"
    r"(is|are) stable and normal)\b"
)
UNCERTAINTY = (
    r"\b(may|might|possible|possibly|probable|questionable|cannot be excluded|could represent|suggest\w*|"
    r"versus|vs)\b"
)
# Clause breaks limit a negation's scope: "no effusion, but a small pneumothorax";
# "effusion without pneumothorax".
_CLAUSE = re.compile(
    r";|,?\s+\b(?:but|however|although|though|whereas)\b|\s+with\s+(?=(?:a|an|the|small|large|"
    r"mild|moderate|left|right|bilateral)\b)"
)


def split_sentences(text: str) -> list[str]:
    """Sentences of a report (list numbers like "1. " dropped; "FINDINGS:" headers split off)."""
    text = re.sub(r"(?:(?<=^)|(?<=\s))\d+\.\s", " ", text or "")
    text = re.sub(r"\b(findings|impression)\s*:", ". ", text, flags=re.I)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n|(?<=\.)(?=[A-Z])", text) if s.strip(" .")]


def clauses(sentence: str) -> list[str]:
    return [p for p in _CLAUSE.split(sentence) if p.strip()]


def _clause_labels(clause: str, findings: Sequence[str]) -> dict[str, str]:
    c = clause.lower()
    out: dict[str, str] = {}
    pre = [m.start() for m in re.finditer(NEGATION_PRE, c)]
    post = [m.start() for m in re.finditer(NEGATION_POST, c)]
    hedged = re.search(UNCERTAINTY, c) is not None
    normal = [m.start() for m in re.finditer(NORMAL_PRE, c)]
    for f in findings:
        spans = [(m.start(), m.end(), True) for m in re.finditer(FINDING_PATTERNS.get(f, r"$^"), c)]
        if f in ANATOMY_PATTERNS and not spans:
            spans = [(m.start(), m.end(), False) for m in re.finditer(ANATOMY_PATTERNS[f], c)]
        for start, end, strong in spans:
            negated = any(p < start for p in pre) or any(p >= end for p in post)
            negated |= not strong and any(p < start for p in normal)
            if not strong and not negated and not re.search(ABNORMAL_QUALIFIER, c):
                continue  # "stable cardiac silhouette": says nothing about enlargement
            lab = NEGATIVE if negated else UNCERTAIN if hedged else POSITIVE
            out[f] = _merge(out.get(f), lab)
    return out


def _merge(a: str | None, b: str) -> str:
    """Positive beats uncertain beats negative (one positive mention makes the finding present)."""
    order = {POSITIVE: 2, UNCERTAIN: 1, NEGATIVE: 0}
    return b if a is None or order[b] > order[a] else a


def label_report(text: str, findings: Sequence[str] | None = None) -> dict[str, str]:
    """Finding -> "positive" / "negative" / "uncertain" for every finding the text mentions."""
    findings = list(findings or FINDING_PATTERNS)
    unknown = [f for f in findings if f not in FINDING_PATTERNS]
    if unknown:
        raise KeyError(f"no patterns for finding(s) {unknown}; known: {sorted(FINDING_PATTERNS)}")
    out: dict[str, str] = {}
    for sent in split_sentences(text):
        for cl in clauses(sent):
            for f, lab in _clause_labels(cl, findings).items():
                out[f] = _merge(out.get(f), lab)
    return out


def positive_findings(text: str, findings: Sequence[str] | None = None) -> set[str]:
    return {f for f, lab in label_report(text, findings).items() if lab == POSITIVE}


def clinical_scores(
    preds: Sequence[str], refs: Sequence[str], findings: Sequence[str] | None = None
) -> dict[str, Any]:
    """Micro precision / recall / F1 of positive findings (generated vs reference), and per-finding F1."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    findings = list(findings or FINDING_PATTERNS)
    tp = dict.fromkeys(findings, 0)
    fp = dict.fromkeys(findings, 0)
    fn = dict.fromkeys(findings, 0)
    for p, r in zip(preds, refs):
        ps, rs = positive_findings(p, findings), positive_findings(r, findings)
        for f in findings:
            tp[f] += int(f in ps and f in rs)
            fp[f] += int(f in ps and f not in rs)
            fn[f] += int(f not in ps and f in rs)

    def prf(t: int, a: int, b: int) -> tuple[float, float, float]:
        prec = t / (t + a) if t + a else 0.0
        rec = t / (t + b) if t + b else 0.0
        return prec, rec, (2 * prec * rec / (prec + rec) if prec + rec else 0.0)

    P, R, F = prf(sum(tp.values()), sum(fp.values()), sum(fn.values()))
    per = {f: round(prf(tp[f], fp[f], fn[f])[2], 4) for f in findings if tp[f] + fp[f] + fn[f] > 0}
    return {
        "clinical_precision": P,
        "clinical_recall": R,
        "clinical_f1": F,
        "clinical_f1_per_finding": per,
        "clinical_support": {f: tp[f] + fn[f] for f in findings if tp[f] + fn[f] > 0},
    }


def _norm(text: str) -> str:
    from medfm.models.report_decoder import words

    return " ".join(words(text))


def bleu_scores(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 (torchmetrics) on lower-cased word tokens, one reference per prediction."""
    from torchmetrics.text import BLEUScore

    p = [_norm(x) for x in preds]
    r = [[_norm(x)] for x in refs]
    return {f"bleu{n}": float(BLEUScore(n_gram=n)(p, r)) for n in (1, 2, 3, 4)}


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (torchmetrics)."""
    from torchmetrics.text import ROUGEScore

    if not preds:
        return 0.0
    s = ROUGEScore(rouge_keys=("rougeL",))([_norm(x) for x in preds], [_norm(x) for x in refs])
    return float(s["rougeL_fmeasure"])


def report_metrics(
    preds: Sequence[str], refs: Sequence[str], findings: Sequence[str] | None = None
) -> dict[str, Any]:
    """BLEU-1..4, ROUGE-L and clinical P/R/F1 in one dict (the numbers `medfm report --eval` prints)."""
    out: dict[str, Any] = {"n": len(preds)}
    out |= bleu_scores(preds, refs)
    out["rougeL"] = rouge_l(preds, refs)
    out |= clinical_scores(preds, refs, findings)
    return out
