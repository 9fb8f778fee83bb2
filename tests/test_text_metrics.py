"""Report metrics: negation-aware finding labeller, clinical P/R/F1, BLEU and ROUGE-L."""

from __future__ import annotations

import pytest

from medfm.eval.text_metrics import (
    NEGATIVE,
    POSITIVE,
    UNCERTAIN,
    bleu_scores,
    clinical_scores,
    label_report,
    report_metrics,
    rouge_l,
    split_sentences,
)


@pytest.mark.parametrize(
    "text,want",
    [
        ("Small right pleural effusion.", {"effusion": POSITIVE}),
        ("No pleural effusion or pneumothorax.", {"effusion": NEGATIVE, "pneumothorax": NEGATIVE}),
        (
            "There is a small left pleural effusion without pneumothorax.",
            {"effusion": POSITIVE, "pneumothorax": NEGATIVE},
        ),
        ("Lungs are free of consolidation.", {"consolidation": NEGATIVE}),
        ("Negative for pneumothorax.", {"pneumothorax": NEGATIVE}),
        ("The previously seen consolidation has resolved.", {"consolidation": NEGATIVE}),
        (
            "No focal consolidation, but there is a 6 mm nodule in the right upper zone.",
            {"consolidation": NEGATIVE, "nodule": POSITIVE},
        ),
        ("Heart size is normal.", {"cardiomegaly": NEGATIVE}),
        ("Normal heart size.", {"cardiomegaly": NEGATIVE}),
        ("Normal heart size, but there is a small right pleural effusion.",
         {"cardiomegaly": NEGATIVE, "effusion": POSITIVE}),
        ("Normal lungs. The heart is enlarged.", {"cardiomegaly": POSITIVE}),
        ("The cardiac silhouette is enlarged.", {"cardiomegaly": POSITIVE}),
        ("Stable cardiomediastinal silhouette.", {}),
        ("Possible left basilar atelectasis.", {"atelectasis": UNCERTAIN}),
    ],
)
def test_labeller_handles_negation_and_scope(text, want):
    assert label_report(text) == want


def test_report_level_positive_wins_and_sections_split():
    r = "FINDINGS: No pneumothorax. There is cardiomegaly.\nIMPRESSION: 1. Cardiomegaly. 2. No effusion."
    assert label_report(r) == {"pneumothorax": NEGATIVE, "cardiomegaly": POSITIVE, "effusion": NEGATIVE}
    assert "1." not in " ".join(split_sentences(r))


def test_clinical_scores_count_positive_findings_only():
    refs = ["Right pleural effusion. No pneumothorax.", "Cardiomegaly.", "Normal chest."]
    preds = ["Pleural effusion. Small pneumothorax.", "No cardiomegaly.", "No pleural effusion."]
    s = clinical_scores(preds, refs, ["effusion", "pneumothorax", "cardiomegaly"])
    # TP: effusion; FP: pneumothorax; FN: cardiomegaly. A negated mention is never a positive.
    assert s["clinical_precision"] == pytest.approx(0.5)
    assert s["clinical_recall"] == pytest.approx(0.5)
    assert s["clinical_f1"] == pytest.approx(0.5)
    assert s["clinical_f1_per_finding"] == {"effusion": 1.0, "pneumothorax": 0.0, "cardiomegaly": 0.0}
    assert clinical_scores(refs, refs)["clinical_f1"] == 1.0


def test_bleu_and_rouge():
    ref = ["There is a small right pleural effusion. No pneumothorax."]
    same = bleu_scores(ref, ref)
    assert all(v == pytest.approx(1.0) for v in same.values())
    other = bleu_scores(["The heart is enlarged with clear lungs."], ref)
    assert other["bleu4"] < 0.1 and other["bleu1"] < same["bleu1"]
    partial = bleu_scores(["There is a small left pleural effusion."], ref)
    assert 0 < partial["bleu4"] < partial["bleu1"] < 1
    assert rouge_l(ref, ref) == pytest.approx(1.0)
    assert 0 < rouge_l(["a small right effusion"], ref) < 1
    m = report_metrics(ref, ref)
    assert m["n"] == 1 and m["rougeL"] == pytest.approx(1.0) and "clinical_f1" in m
    with pytest.raises(ValueError):
        clinical_scores(["a"], [])
