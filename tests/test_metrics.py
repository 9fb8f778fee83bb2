"""Metrics, calibration and bootstrap: pure functions checked against hand-computable cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from medfm.eval.bootstrap import bootstrap_ci
from medfm.eval.calibration import expected_calibration_error, reliability_bins
from medfm.eval.evaluate import evaluate_table, split_columns
from medfm.eval.metrics import binary_metrics, classification_metrics, infer_task, youden_threshold


def test_binary_metrics_hand_computed():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.3, 0.7, 0.8, 0.4, 0.9])
    m = binary_metrics(y, p, threshold=0.5)
    # predictions: 0 0 1 0 | 1 1 0 1 -> TP 3, FN 1, TN 3, FP 1
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    # AUROC: of the 16 (pos, neg) pairs only (0.4, 0.6) is ranked wrongly -> 15/16
    assert m["auroc"] == pytest.approx(15 / 16)
    assert m["n"] == 8


def test_youden_threshold_and_one_class():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.35, 0.3, 0.8, 0.9])
    thr = youden_threshold(y, p)
    m = binary_metrics(y, p, threshold="youden")
    assert m["threshold"] == thr
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(2 / 3)
    one = binary_metrics(np.ones(5, int), np.linspace(0.1, 0.9, 5))
    assert math.isnan(one["auroc"]) and math.isnan(one["specificity"])


def test_ece_perfect_and_overconfident():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)  # calibrated by construction
    assert expected_calibration_error(y, p, "binary") < 0.02
    y_bad = (rng.random(20000) < 0.5).astype(int)
    p_bad = np.where(y_bad == 1, 0.99, 0.98)  # always ~99 % sure of class 1, right half the time
    assert expected_calibration_error(y_bad, p_bad, "binary") == pytest.approx(0.485, abs=0.02)
    b = reliability_bins(y, p, "binary", n_bins=10)
    ok = b["count"] > 0
    assert np.abs(b["confidence"][ok] - b["observed"][ok]).max() < 0.05
    assert b["count"].sum() == 20000


def test_multiclass_and_multilabel_metrics():
    y = np.array([0, 1, 2, 0, 1, 2])
    p = np.eye(3)[[0, 1, 2, 0, 2, 2]] * 0.8 + 0.2 / 3
    m = classification_metrics(y, p)
    assert infer_task(y, p) == "multiclass"
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert 0.5 < m["auroc"] <= 1.0
    yl = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    pl = np.array([[0.9, 0.2], [0.1, 0.7], [0.8, 0.6], [0.3, 0.4]])
    ml = classification_metrics(yl, pl, "multilabel", label_names=["a", "b"])
    assert ml["auroc/a"] == pytest.approx(1.0) and ml["auroc/b"] == pytest.approx(1.0)
    assert ml["accuracy"] == pytest.approx(1.0)


def test_bootstrap_patient_level_is_wider_for_correlated_images():
    rng = np.random.default_rng(0)
    n_pat = 40
    # each patient contributes 10 near-identical images: the effective sample size is 40, not 400
    pat_y = rng.integers(0, 2, n_pat)
    pat_p = np.clip(pat_y * 0.3 + rng.random(n_pat) * 0.7, 0, 1)
    y, p = np.repeat(pat_y, 10), np.repeat(pat_p, 10)
    groups = np.repeat([f"p{i}" for i in range(n_pat)], 10)

    def fn(a, b):
        return binary_metrics(a, b)

    ci_img = bootstrap_ci(fn, y, p, None, n_boot=100, seed=1)["auroc"]
    ci_pat = bootstrap_ci(fn, y, p, groups, n_boot=100, seed=1)["auroc"]
    assert ci_img["lo"] <= ci_img["value"] <= ci_img["hi"]
    assert (ci_pat["hi"] - ci_pat["lo"]) > 1.8 * (ci_img["hi"] - ci_img["lo"])
    assert ci_pat["n_boot"] == 100


def test_evaluate_table_layouts_and_errors(tmp_path):
    from medfm.errors import InputError

    df = pd.DataFrame({"patient_id": ["a", "a", "b", "c"], "y": [0, 0, 1, 1], "p": [0.1, 0.4, 0.8, 0.3]})
    res = evaluate_table(df, n_boot=20)
    assert res["task"] == "binary" and res["resampling"] == "patient"
    assert res["metrics"]["auroc"] == pytest.approx(0.75)
    assert set(res["ci"]) >= {"auroc", "accuracy", "ece"}
    mc = pd.DataFrame({"y": [0, 1, 2], "p_0": [0.8, 0.1, 0.1], "p_1": [0.1, 0.8, 0.1],
                       "p_2": [0.1, 0.1, 0.8]})
    assert split_columns(mc)[2] == "multiclass"
    with pytest.raises(InputError, match="predictions need columns"):
        split_columns(pd.DataFrame({"label": [1], "score": [0.3]}), "x.csv")
    with pytest.raises(InputError, match="NaN"):
        evaluate_table(pd.DataFrame({"y": [0, 1], "p": [0.2, np.nan]}), n_boot=0, where="x.csv")


def test_evaluate_cli_on_predictions_file(tmp_path):
    from typer.testing import CliRunner

    from medfm.cli.app import app

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    df = pd.DataFrame({"case_id": range(60), "patient_id": np.arange(60) // 2, "y": y,
                       "p": np.clip(y * 0.4 + rng.random(60) * 0.6, 0, 1)})
    f = tmp_path / "preds.csv"
    df.to_csv(f, index=False)
    r = CliRunner().invoke(app, ["evaluate", str(f), "--n-boot", "50", "--threshold", "youden"])
    assert r.exit_code == 0, r.output
    assert "auroc" in r.output
    import json

    res = json.loads((tmp_path / "preds.metrics.json").read_text())
    assert res["metrics"]["auroc"] > 0.7 and res["ci"]["auroc"]["lo"] < res["metrics"]["auroc"]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    r = CliRunner().invoke(app, ["evaluate", str(bad)])
    assert r.exit_code != 0 and "predictions need columns" in str(r.exception)
