"""The adapted classifier: `medfm adapt --save-model` -> a "classifier" run that reloads and reproduces the
run's test predictions; per-site training; `medfm evaluate` with each run's recorded threshold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import medfm
from medfm.cli.app import app
from medfm.errors import ConfigError, InputError
from medfm.rundir import open_run
from medfm.tasks.adapt import AdaptConfig, Budget, Classifier, fit_classifier, predict_store, run_adapt
from test_adapt import make_prepared  # tests/ is on sys.path (pytest rootdir import mode)

OLD_ADAPT = Path(__file__).parent / "fixtures" / "old_runs" / "adapt"


def _encoder():
    from medfm.models.registry import create_encoder

    torch.manual_seed(0)
    return create_encoder("vit_tiny", img_size=16, patch_size=4, depth=1, embed_dim=16, num_heads=2)


def _recorded(out: Path, run_id: str) -> tuple[pd.DataFrame, pd.Series]:
    preds = pd.read_parquet(out / "predictions.parquet")
    row = pd.read_csv(out / "results.csv").set_index("run_id").loc[run_id]
    return preds[preds["run_id"] == run_id].reset_index(drop=True), row


def _probs(df: pd.DataFrame, clf: Classifier) -> np.ndarray:
    if clf.task == "binary":
        return df["prob"].to_numpy()
    return df[[f"prob_{c}" for c in clf.classes]].to_numpy()


def _recorded_probs(preds: pd.DataFrame, clf: Classifier) -> np.ndarray:
    if clf.task == "binary":
        return preds["p"].to_numpy()
    if clf.task == "multiclass":
        return preds[[f"p_{j}" for j in range(len(clf.classes))]].to_numpy()
    return preds[[f"p_{c}" for c in clf.classes]].to_numpy()


def test_adapt_cli_saves_a_classifier_that_reproduces_the_run(tmp_path):
    from medfm.models.io import save_encoder

    data = make_prepared(tmp_path / "data", n=40)
    save_encoder(_encoder(), tmp_path / "enc")
    out = tmp_path / "adapt"
    r = CliRunner().invoke(app, ["adapt", str(tmp_path / "enc"), str(data), "-m", "linear,knn,prototype",
                                 "--fractions", "0.5,1.0", "--seeds", "1", "--k", "5", "--save-model",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Model:" in r.output
    assert "Saved model" in (out / "report.html").read_text()
    assert open_run(out).kind == "adapt"  # the adapt dir is a run dir written by RunDir too
    run = open_run(out / "model")
    conf = run.config()
    assert run.kind == "classifier" and conf["method"] in ("linear", "prototype")  # kNN keeps no model
    assert conf["budget"] == {"regime": "fraction", "value": 1.0} and conf["seed"] == 0
    clf = medfm.load_run(out / "model")
    assert isinstance(clf, Classifier) and clf.classes == ["0", "1"] and clf.task == "binary"
    preds, row = _recorded(out, conf["run_id"])
    assert clf.threshold == pytest.approx(float(row["threshold"]))
    assert clf.threshold != 0.5  # Youden's J on val, not a default
    df, feats = predict_store(clf, data, split="test", return_features=True)
    assert list(df["case_id"]) == list(preds["case_id"])
    np.testing.assert_allclose(df["prob"], preds["p"], atol=1e-5)
    assert (df["label"].to_numpy() == preds["y"].to_numpy()).all()
    assert {"patient_id", "site", "split", "prob", "pred"} <= set(df.columns) and "report" not in df
    assert ((df["prob"] >= clf.threshold).astype(int) == df["pred"]).all()
    assert feats.shape == (len(df), 16)
    # the tensor interface the audit uses: logits (B, K), probabilities, features, gradients
    x = torch.rand(3, 1, 16, 16, requires_grad=True)
    logits = clf(x)
    assert logits.shape == (3, 2) and clf.embed(x).shape == (3, 16)
    torch.testing.assert_close(clf.predict_proba(x).sum(1), torch.ones(3))
    logits[:, 1].sum().backward()
    assert x.grad.abs().sum() > 0
    # the encoder alone loads with the ordinary loader; the card describes the model; no full paths
    assert isinstance(medfm.load_encoder(out / "model" / "encoder.safetensors"), torch.nn.Module)
    card = (out / "model" / "README.md").read_text()
    assert "adapted classifier" in card and "Youden" in card and str(tmp_path) not in card
    assert str(tmp_path) not in (out / "model" / "config.json").read_text()
    assert "preprocessing" in conf
    assert run.metrics()["max_abs_diff_vs_run"] < 1e-5


@pytest.mark.parametrize("task, method", [("multiclass", "prototype"), ("multilabel", "linear"),
                                          ("multilabel", "prototype"), ("binary", "lpft")])
def test_saved_heads_reproduce_every_task(tmp_path, task, method):
    data = make_prepared(tmp_path / "d", n=40, task=task)
    out = tmp_path / "o"
    cfg = AdaptConfig(methods=[method], budgets=[Budget("fraction", 1.0)], seeds=1, save_model=True,
                      steps=4, batch_size=8)
    run_adapt(_encoder(), data, out, cfg)
    clf = medfm.load_run(out / "model")
    preds, row = _recorded(out, open_run(out / "model").config()["run_id"])
    probs = _probs(predict_store(clf, data, split="test"), clf)
    np.testing.assert_allclose(probs, _recorded_probs(preds, clf), atol=1e-4)
    assert probs.std() > 0.01  # real predictions, not constants
    if task == "multilabel":
        assert clf.threshold == pytest.approx(json.loads(row["threshold"]))
    elif task == "multiclass":
        assert clf.threshold is None


def test_knn_keeps_no_model(tmp_path):
    data = make_prepared(tmp_path / "d", n=40)
    out = tmp_path / "o"
    run_adapt(_encoder(), data, out, AdaptConfig(methods=["knn"], budgets=[Budget("fraction", 1.0)], seeds=1,
                                                 knn_k=5, save_model=True))
    assert (out / "results.csv").is_file() and not (out / "model").exists()
    with pytest.raises(ConfigError, match="keeps no model"):
        fit_classifier(_encoder(), data, method="knn")


def test_fit_classifier_per_site(tmp_path):
    """The audit's helper: one model per site, trained on that site's cases only, saved as a run."""
    data = make_prepared(tmp_path / "d", n=40, sites=("a", "b"))
    clf = fit_classifier(_encoder(), data, tmp_path / "site_a", method="linear", sites=["a"])
    conf = open_run(tmp_path / "site_a").config()
    assert conf["sites"] == ["a"] and conf["data"][0]["sites"] == ["a"] and conf["data"][0]["name"] == "d"
    n_train_a = int(((pd.read_parquet(data / "manifest.parquet")["split"] == "train")
                     & (pd.read_parquet(data / "manifest.parquet")["site"] == "a")).sum())
    assert conf["data"][0]["images"] == n_train_a
    reloaded = medfm.load_run(tmp_path / "site_a")
    both = predict_store(clf, data)
    np.testing.assert_allclose(predict_store(reloaded, data)["prob"], both["prob"], atol=1e-6)
    assert set(both["site"]) == {"a", "b"}  # predicts any site: the cross-site matrix needs that
    with pytest.raises(InputError, match="site"):
        fit_classifier(_encoder(), data, method="linear", sites=["nowhere"])


def test_classifier_run_errors_are_one_line(tmp_path):
    data = make_prepared(tmp_path / "d", n=40)
    fit_classifier(_encoder(), data, tmp_path / "m", method="linear")
    (tmp_path / "m" / "head.safetensors").unlink()
    with pytest.raises(InputError, match="head.safetensors"):
        medfm.load_run(tmp_path / "m")
    from medfm.tasks.adapt.classifier import load_classifier

    with pytest.raises(InputError, match="not a 'classifier' run"):
        load_classifier(shutil.copytree(OLD_ADAPT, tmp_path / "old"))


def test_evaluate_applies_each_runs_recorded_threshold(tmp_path):
    from medfm.eval.evaluate import evaluate_adapt_dir

    data = make_prepared(tmp_path / "d", n=60)
    out = tmp_path / "o"
    budgets = [Budget("fraction", 0.5), Budget("fraction", 1.0)]
    cfg = AdaptConfig(methods=["linear", "prototype"], seeds=1, budgets=budgets)
    res = run_adapt(_encoder(), data, out, cfg)
    assert (res["threshold"] != 0.5).any()
    m = evaluate_adapt_dir(out, n_boot=0).set_index("run_id").loc[res["run_id"]]
    np.testing.assert_allclose(m["threshold"].astype(float), res["threshold"].astype(float))
    for k in ("accuracy", "sensitivity", "specificity", "f1"):  # thresholded metrics match adapt's own
        np.testing.assert_allclose(m[k], res[k].to_numpy(), err_msg=k)
    fixed = evaluate_adapt_dir(out, threshold=0.5, n_boot=0)
    assert (fixed["threshold"] == 0.5).all()
    # an adapt run written by older code (threshold column 0.5) still evaluates
    old = evaluate_adapt_dir(shutil.copytree(OLD_ADAPT, tmp_path / "old"), n_boot=0)
    assert len(old) == len(pd.read_csv(OLD_ADAPT / "results.csv")) and (old["threshold"] == 0.5).all()
