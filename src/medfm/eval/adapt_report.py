"""Label-efficiency report of an adapt directory: curves, tables, ROC, calibration, embeddings, examples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.eval import plots
from medfm.eval.calibration import reliability_bins
from medfm.eval.embedding_map import embed_2d
from medfm.eval.evaluate import split_columns
from medfm.eval.html import Report
from medfm.eval.metrics import roc_points
from medfm.rundir import read_json

_METHOD_TEXT = {
    "linear": "logistic regression on frozen, standardised features (C chosen on val)",
    "knn": "k nearest neighbours on frozen features (cosine, distance-weighted)",
    "prototype": "nearest class prototype (mean of L2-normalised frozen features)",
    "finetune": "encoder + linear head trained end to end (AdamW)",
    "lpft": "linear probe first, then the whole network fine-tuned from that head (LP-FT)",
    "lora": "low-rank adapters (peft LoRA) + linear head; encoder weights frozen",
    "scratch": "same architecture from random init, same labels and steps (baseline)",
}


def mean_sd_table(results: pd.DataFrame, metrics: tuple[str, ...] = ("auroc", "accuracy", "balanced_accuracy",
                                                                      "ece")) -> pd.DataFrame:
    """One row per method × budget with "mean ± sd" strings over seeds (readable in the report)."""
    rows = []
    for (method, regime, budget), g in results.groupby(["method", "regime", "budget"], sort=False):
        row = {"method": method, "labels": g["budget_label"].iloc[0] if "budget_label" in g else budget,
               "n_labels": f"{g['n_labels'].mean():.0f}", "seeds": int(g["seed"].nunique())}
        for m in metrics:
            if m in g:
                mu, sd = g[m].mean(), g[m].std()
                row[m] = "–" if math.isnan(mu) else (f"{mu:.3f} ± {sd:.3f}" if len(g) > 1 else f"{mu:.3f}")
        rows.append((regime != "fraction", budget, method, row))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    return pd.DataFrame([r[3] for r in rows])


def threshold_text(setting: object, task: str, used: pd.Series | None = None) -> str:
    """How accuracy / sensitivity / specificity were thresholded, in words (for the report)."""
    if task == "multiclass":
        return "argmax over classes (no threshold)"
    if str(setting) == "youden":
        how = "per label, " if task == "multilabel" else ""
        text = f"chosen on val by Youden's J ({how}per run, then applied to test)"
        vals = pd.to_numeric(used, errors="coerce").dropna() if used is not None else pd.Series(dtype=float)
        if len(vals):
            one = vals.nunique() == 1
            text += f"; {vals.iloc[0]:.3f}" if one else f"; range {vals.min():.3f}–{vals.max():.3f}"
        return text
    return f"fixed {float(setting):g}"


def _headline_runs(results: pd.DataFrame) -> pd.DataFrame:
    """Per method, the seed-0 run at the largest label budget (fractions preferred over shots)."""
    regime = "fraction" if (results["regime"] == "fraction").any() else "shots"
    sub = results[results["regime"] == regime]
    top = sub[sub["budget"] == sub["budget"].max()]
    return top[top["seed"] == top["seed"].min()]


def _saved_model_text(root: Path) -> str:
    """What ``model/`` holds (``medfm adapt --save-model``), in words; "" when the run saved none."""
    p = root / "model" / "config.json"
    if not p.is_file():
        return ""
    try:
        conf = read_json(p)
    except Exception:  # a damaged model folder must not stop the report
        return ""
    thr = conf.get("threshold")
    thr_text = ("argmax over classes" if thr is None else
                f"threshold {', '.join(f'{float(t):.3f}' for t in thr)}" if isinstance(thr, list) else
                f"threshold {float(thr):.3f}")
    return (f"model/ holds the {conf.get('method', '?')} classifier of run {conf.get('run_id', '?')}, "
            "chosen by validation AUROC among the methods that keep a model at the largest label budget "
            f"({thr_text}, {conf.get('threshold_rule', 'given')}). Load it with medfm.load_run(\"model\"); "
            "medfm.tasks.adapt.predict_store runs it over any prepared dataset.")


def _examples(cfg: dict, preds: pd.DataFrame, task: str, names: list[str], n: int = 16,
              threshold: float = 0.5):
    """Thumbnails of test cases with true/pred/prob: half the most confident right, half wrong if any."""
    from medfm.data.store import PreparedDataset

    try:
        ds = PreparedDataset(cfg["data"], cfg.get("adapt", {}).get("splits", ["train", "val", "test"])[2])
    except Exception:  # data moved or deleted since the run: the report is still useful without thumbnails
        return None
    y, p, _, _ = split_columns(preds)
    if task == "multilabel":
        return None
    if task == "binary":
        # the run's own threshold, so "right"/"wrong" agree with the accuracy the report states
        pred, conf = (p >= threshold).astype(int), np.where(p >= threshold, p, 1 - p)
    else:
        pred, conf = p.argmax(1), p.max(1)
    right, wrong = np.flatnonzero(pred == y), np.flatnonzero(pred != y)
    pick = list(right[np.argsort(-conf[right])][: n // 2]) + list(wrong[np.argsort(-conf[wrong])][: n // 2])
    pick += [i for i in np.argsort(-conf) if i not in pick][: n - len(pick)]
    pos = {c: i for i, c in enumerate(ds.manifest["case_id"].astype(str))}
    idx = [pos[c] for c in preds["case_id"].astype(str).iloc[pick] if c in pos]
    if not idx:
        return None
    imgs = [ds.image_array(i) for i in idx]

    def name(k: int) -> str:
        return names[k] if k < len(names) else str(k)

    return plots.prediction_grid(imgs, [name(int(y[i])) for i in pick], [name(int(pred[i])) for i in pick],
                                 [float(conf[i]) for i in pick])


def build_adapt_report(adapt_dir: str | Path, out: str | Path | None = None, title: str | None = None,
                       reference: dict[str, float] | None = None, ci: pd.DataFrame | None = None,
                       embedding_method: str = "auto", intro: str | None = None) -> Path:
    """Write report.html for an adapt directory and return its path."""
    root = Path(adapt_dir)
    cfg = read_json(root / "config.json")
    results = pd.read_csv(root / "results.csv")
    preds = pd.read_parquet(root / "predictions.parquet")
    task = cfg["task"]
    names = cfg.get("label_names", [])
    enc = cfg.get("encoder", {})
    data_name = Path(cfg.get("data", "")).name
    r = Report(title or f"Label efficiency on {data_name}",
               subtitle=f"encoder {enc.get('name', '?')} · {task} · "
                        f"methods: {', '.join(results.method.unique())}")
    if intro:
        r.add_text(intro)
    r.add_kv({"model": cfg.get("source") or enc.get("name", "?"), "dataset": cfg.get("data", ""),
              "task": f"{task} ({', '.join(map(str, names))})",
              "cases train / val / test": " / ".join(str(cfg["n"].get(s, "?"))
                                                     for s in ("train", "val", "test")),
              "label budgets": ", ".join(dict.fromkeys(results["budget_label"].astype(str))),
              "seeds": int(results["seed"].nunique()),
              # runs from before the val-chosen default recorded "0.5" in config.json; absent means fixed 0.5
              "threshold": threshold_text(cfg.get("adapt", {}).get("threshold", "0.5"), task,
                                          results.get("threshold"))})

    r.add_heading("Label efficiency")
    text = ("Test metric against the number of labelled training images; lines are the mean over seeds "
            "and bands ± one standard deviation.")
    if "scratch" in set(results["method"]):
        # only describe the dashed baseline when it is actually drawn (scratch may have run separately)
        text += (" The dashed grey line is the same architecture trained from scratch on the same labels "
                 "with the same step budget: pretraining pays off where the solid lines lie above it.")
    r.add_text(text)
    r.add_figure(plots.label_efficiency(results, "auroc", reference), caption="AUROC vs labelled images")
    if "accuracy" in results:
        r.add_figure(plots.label_efficiency(results, "balanced_accuracy"),
                     caption="balanced accuracy vs labelled images")
    r.add_table(mean_sd_table(results), caption="Test metrics, mean ± sd over seeds")

    head = _headline_runs(results)
    if len(head):
        label = head["budget_label"].iloc[0]
        r.add_heading(f"ROC and calibration ({label}, seed {int(head['seed'].iloc[0])})")
        curves, bins, eces = {}, {}, {}
        for run in head.itertuples(index=False):
            pr = preds[preds["run_id"] == run.run_id]
            y, p, t, _ = split_columns(pr)
            fpr, tpr = roc_points(y, p, t)
            curves[run.method] = (fpr, tpr, float(run.auroc))
            bins[run.method] = reliability_bins(y, p, t)
            eces[run.method] = float(run.ece)
        r.begin_row()
        r.add_figure(plots.roc_curves(curves), caption="ROC on the test split"
                     + (" (micro-averaged one-vs-rest)" if task != "binary" else ""))
        r.add_figure(plots.reliability_diagram(bins, eces), caption="Reliability diagram (10 bins)")
        r.end_row()

    emb = root / "embeddings.npz"
    if emb.is_file():
        z = np.load(emb, allow_pickle=False)
        feats, lab = z["features"], z["labels"]
        if lab.ndim == 2:  # multi-label: colour by the first positive finding, "none" otherwise
            lab = np.array([names[int(np.argmax(v))] if v.any() else "none" for v in lab])
        elif names and len(names) > int(lab.max(initial=0)):
            lab = np.array([names[int(v)] for v in lab])
        method = embedding_method
        if method == "auto":
            method = "tsne" if 50 <= len(feats) <= 3000 else "pca"
        xy = embed_2d(feats, method)
        r.add_heading("Embedding map")
        r.add_text("Frozen encoder embeddings of the test split mapped to 2-D. Clusters by label mean the "
                   "features separate the classes without training; clusters by site warn of a site "
                   "signature (a shortcut risk).")
        r.add_figure(plots.embedding_map(xy, lab, z["site"] if z["site"].size else None,
                                         "t-SNE" if method == "tsne" else "PCA"))

    if len(head):
        best = head.sort_values("auroc", ascending=False).iloc[0]
        thr = pd.to_numeric(pd.Series([best.get("threshold", 0.5)]), errors="coerce").fillna(0.5).iloc[0]
        fig = _examples(cfg, preds[preds["run_id"] == best["run_id"]], task, names, threshold=float(thr))
        if fig is not None:
            r.add_heading(f"Example predictions ({best['method']}, {best['budget_label']})")
            r.add_text("Most confident correct (green) and incorrect (red) test cases; the number is the "
                       "model's confidence in its prediction.")
            r.add_figure(fig)

    saved = _saved_model_text(root)
    if saved:
        r.add_heading("Saved model")
        r.add_text(saved)

    if ci is not None and len(ci):
        r.add_heading("Bootstrap confidence intervals")
        cols = [c for c in ("auroc", "accuracy", "sensitivity", "specificity", "ece") if f"{c}_lo" in ci]
        sub = ci.dropna(subset=[f"{cols[0]}_lo"]) if cols else ci.iloc[0:0]
        table = pd.DataFrame({"run": sub["run_id"], **{
            c: [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in zip(sub[c], sub[f"{c}_lo"], sub[f"{c}_hi"])]
            for c in cols}})
        r.add_table(table, caption="point estimate [95 % CI], patient-level bootstrap")

    r.add_heading("Protocol")
    r.add_text(" ".join(f"{m}: {_METHOD_TEXT.get(m, m)}." for m in results["method"].unique()))
    r.add_note("Label subsets are drawn per seed at patient level, stratified by class; k-shot means k "
               "labelled images per class from distinct patients. The validation split (all of its labels) "
               "is used for model selection (C of the linear probe, the decision threshold when chosen by "
               "Youden's J), so "
               "low-label results are slightly optimistic relative to a strictly k-label protocol.")
    r.add_heading("All runs", level=3)
    keep = [c for c in ("run_id", "n_labels", "n_patients", "auroc", "accuracy", "balanced_accuracy", "f1",
                        "sensitivity", "specificity", "threshold", "ece", "time_s") if c in results]
    table = results[keep].copy()
    if "n_patients" in table and table["n_patients"].isna().all():
        # no patient ids in the data: label subsets were drawn per image, the patient count is unknown
        table["n_patients"] = "unknown (no patient ids; sampling is per image)"
    r.add_table(table, caption="results.csv (one row per method × budget × seed)")
    return r.save(Path(out) if out else root / "report.html")
