"""One adapted classifier, trained and saved: the model ``medfm adapt --save-model`` keeps, and the
per-site models an audit trains (:func:`fit_classifier`)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from medfm.errors import ConfigError
from medfm.rundir import RunDir
from medfm.tasks.adapt.classifier import (
    Classifier,
    device_of,
    load_classifier,
    predict_arrays,
    save_classifier,
)
from medfm.tasks.adapt.protocol import Budget
from medfm.tasks.adapt.runner import (
    METRIC_KEYS,
    AdaptConfig,
    AdaptContext,
    build_context,
    model_candidates,
    one_run,
    run_id,
    store_preprocessing,
)


def classifier_from_result(base: AdaptContext, res: dict, method: str,
                           preprocessing: dict[str, Any] | None = None) -> Classifier:
    """The :class:`Classifier` of one method's output (its head, on its trained or the frozen encoder)."""
    head = res.get("head")
    if head is None:
        raise ConfigError(f"method '{method}' keeps no model to save (kNN looks up the training features); "
                          "save linear, prototype or a trained method instead")
    encoder = res["encoder"] if res.get("encoder") is not None else base.encoder
    thr = res.get("threshold")
    threshold = None if base.task == "multiclass" else thr
    return Classifier(encoder, head, base.task, base.label_names, threshold, preprocessing, method).eval()


def _threshold_rule(cfg: AdaptConfig, task: str) -> str:
    if task == "multiclass":
        return "argmax"
    return "Youden's J on the validation split" if cfg.threshold == "youden" else f"fixed {cfg.threshold}"


def _test_probs(clf: Classifier, images: np.ndarray) -> np.ndarray:
    p, _ = predict_arrays(clf, images)
    return p[:, 1] if clf.task == "binary" else p


def save_run(clf: Classifier, out_dir: str | Path, base: AdaptContext, ds: dict, row: dict, res: dict,
             data_dir: str | Path, budget: Budget, seed: int, extra: dict[str, Any] | None = None) -> RunDir:
    """Save ``clf`` with the run's metrics, training data description and a reproduction check: the test
    probabilities of the model reloaded from the files against the ones the run recorded."""
    metrics = {k: row[k] for k in (*METRIC_KEYS, "val_auroc") if k in row}
    train_m = ds["train"].manifest
    n_pat = row.get("n_patients")
    data = [{"name": Path(data_dir).name, "split": "train", "images": row.get("n_labels"),
             "patients": None if n_pat is None or (isinstance(n_pat, float) and math.isnan(n_pat)) else n_pat,
             "sites": sorted(train_m["site"].astype(str).unique()) if "site" in train_m else None}]
    cols = [str(c) for c in ds["train"].label_columns]  # names a binary finding whose classes are 0 / 1
    run = save_classifier(clf, out_dir, threshold_rule=_threshold_rule(base.cfg, base.task),
                          budget={"regime": budget.regime, "value": float(budget.value)}, seed=seed,
                          data=data, metrics=metrics,
                          extra={"run_id": row.get("run_id"), "label_columns": cols, **(extra or {})})
    reloaded = load_classifier(run.path, device=device_of(clf))
    diff = np.abs(_test_probs(reloaded, base.images["test"]) - np.asarray(res["test"]))
    run.write_metrics({"max_abs_diff_vs_run": float(np.max(diff, initial=0.0))})
    run.write_card()
    return run


def save_best(base: AdaptContext, ds: dict, out: Path, results: pd.DataFrame, kept: dict[str, dict],
              data_dir: str | Path) -> RunDir | None:
    """Save the best model of an adapt run as ``out/model``: highest validation AUROC among the methods
    that keep a model, at the largest label budget, first seed (test metrics never choose). A run resumed
    from ``partial/`` is retrained (same seed, same result). None when no method keeps a model."""
    cands = model_candidates(base.cfg)
    by_id = {run_id(m, b, s): (b, s, m) for b, s, m in cands}
    sub = results[results["run_id"].isin(list(by_id))]
    if not len(sub):
        return None
    order = {m: i for i, m in enumerate(base.cfg.methods)}
    score = pd.to_numeric(sub["val_auroc"], errors="coerce").fillna(-math.inf)
    best = sub.assign(_s=score, _o=sub["method"].map(order)).sort_values(["_s", "_o"],
                                                                         ascending=[False, True]).iloc[0]
    rid = str(best["run_id"])
    budget, seed, method = by_id[rid]
    res = kept.get(rid) or one_run(base, ds["test"], out, budget, seed, method, rid)[2]
    clf = classifier_from_result(base, res, method, store_preprocessing(data_dir))
    why = "validation AUROC among the methods at the largest label budget"
    return save_run(clf, out / "model", base, ds, best.drop(["_s", "_o"]).to_dict(), res, data_dir, budget,
                    seed, extra={"selected_by": why})


def fit_classifier(encoder: nn.Module, data_dir: str | Path, out_dir: str | Path | None = None,
                   method: str = "linear", budget: Budget = Budget("fraction", 1.0), seed: int = 0,
                   cfg: AdaptConfig | None = None, sites: list[str] | None = None) -> Classifier:
    """Train one classifier (``method`` at ``budget`` with ``seed``) on a prepared store, optionally on the
    cases of ``sites`` only (train, val and test are all restricted: its metrics are internal to those
    sites), and save it as a classifier run in ``out_dir`` when given. ``cfg`` supplies the recipe
    (steps, learning rates, threshold rule...); its methods, budgets and seeds are replaced."""
    cfg = replace(cfg or AdaptConfig(methods=[method]), methods=[method], budgets=[budget], seeds=1,
                  first_seed=seed, save_adapters=False, save_model=False)
    rid = run_id(method, budget, seed)
    with tempfile.TemporaryDirectory(prefix="medfm-fit-") as tmp:  # features are not part of the run
        base, ds, _ = build_context(encoder, data_dir, cfg, Path(tmp) / "features", sites=sites)
        row, _, res = one_run(base, ds["test"], Path(tmp), budget, seed, method, rid)
    clf = classifier_from_result(base, res, method, store_preprocessing(data_dir))
    if out_dir is not None:
        save_run(clf, out_dir, base, ds, row, res, data_dir, budget, seed,
                 extra={"sites": list(map(str, sites)) if sites is not None else None})
    return clf
