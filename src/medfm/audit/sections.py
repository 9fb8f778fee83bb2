"""The audit's statistics sections, computed from the predicted :class:`~medfm.audit.cases.Cases`.

Each function returns ``(section, arrays)``: ``section`` is the JSON-ready part of audit.json (or None with
a reason in ``arrays["note"]``), ``arrays`` what the figures need beyond it (never written to audit.json).
The numbers come from the modules that own them (cross_site, shift, ood, fairness, calibration, shortcut);
this module only chooses which cases go in.

Pooled evaluation set (fairness, calibration): the reference's test cases plus every labelled target's
cases, with ``dataset`` as an extra attribute when there is more than one dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from medfm.audit.cases import Cases
from medfm.errors import MedfmError

MAX_SITE_PAIRS = 6  # within-dataset site-vs-rest shift tests per dataset (each runs the full suite)
EMPTY = {"", "nan", "None", "NaN", "<NA>", "unknown"}


def _prob(c: Cases, m: np.ndarray) -> np.ndarray:
    return c.df.loc[m, "prob"].to_numpy(float)


def _labels(c: Cases, m: np.ndarray) -> np.ndarray:
    return c.df.loc[m, "label"].to_numpy(float).astype(int)


def _both_classes(y: np.ndarray) -> bool:
    return len(np.unique(y)) == 2


# ---------------------------------------------------------------- performance / cross-site


def _pred_rows(c: Cases, m: np.ndarray, train: str, test: np.ndarray | str) -> pd.DataFrame:
    return pd.DataFrame({"label": _labels(c, m), "prob": _prob(c, m), "train_site": train,
                         "test_site": test, "patient_id": c.patient_ids(m)})


def _site_names(c: Cases, m: np.ndarray) -> np.ndarray:
    """``dataset/site`` per row (``dataset/all`` where the manifest has no site)."""
    sites = c.df.loc[m, "site"].astype(str) if "site" in c.df else pd.Series("all", index=c.df.index[m])
    return (c.name + "/" + sites.where(~sites.isin(EMPTY), "all")).to_numpy()


def _site_model_rows(name: str, clf, cases: list[Cases]) -> list[pd.DataFrame]:
    """One per-site model's predictions on every dataset's labelled test cases."""
    from dataclasses import replace

    from medfm.tasks.adapt.classifier import predict_store

    rows = []
    for c in cases:
        df = predict_store(clf, c.path, split="test")
        df = df[df["label"].notna()].reset_index(drop=True).assign(eval=True)
        if len(df):
            sub = replace(c, df=df)  # the same dataset (name, patient-id prefix), this model's predictions
            m = np.ones(len(df), bool)
            rows.append(_pred_rows(sub, m, name, _site_names(sub, m)))
    return rows


def _matrix(preds: list[pd.DataFrame], thresholds: dict, cfg) -> dict | None:
    from medfm.audit.cross_site import cross_site_matrix

    if not preds:
        return None
    df = pd.concat(preds, ignore_index=True)
    keep = df.groupby(["train_site", "test_site"])["label"].transform(lambda s: s.nunique() == 2)
    if not keep.any():
        return None
    return cross_site_matrix(df[keep], thresholds, n_boot=cfg.n_boot, alpha=cfg.alpha, seed=cfg.seed)


def performance(cases: list[Cases], threshold: float, cfg, site_models: list[tuple[str, object]] = ()
                ) -> tuple[dict | None, dict]:
    """By dataset (the reference's test split is internal, each target external, with the drop), by site,
    and with ``site_models`` the train-site x test-site matrix of per-site models on every test split."""
    ref = cases[0]
    by_ds, by_site = [], []
    for c in cases:
        m = c.rows(labelled=True)
        if m.any():
            by_ds.append(_pred_rows(c, m, ref.name, c.name))
            by_site.append(_pred_rows(c, m, "model", _site_names(c, m)))
    if not by_ds:
        return None, {"note": "no dataset has labels (monitor mode): no performance to report"}
    out = {"by_dataset": _matrix(by_ds, {ref.name: threshold}, cfg),
           "by_site": _matrix(by_site, {"model": threshold}, cfg), "threshold": threshold,
           "internal": ref.name, "per_site_models": None}
    notes = []
    if site_models:
        thr = {n: clf.threshold if isinstance(clf.threshold, int | float) else 0.5 for n, clf in site_models}
        rows = [r for n, clf in site_models for r in _site_model_rows(n, clf, cases)]
        out["per_site_models"] = _matrix(rows, thr, cfg)
    else:
        notes.append("per-site models not trained (use --per-site for the train-site x test-site matrix)")
    out["notes"] = notes
    return out, {}


# ---------------------------------------------------------------- shift


def _held(c: Cases) -> np.ndarray:
    """Cases a shift test may use: the reference's held-out (val + test) cases, a target's all."""
    if c.role == "reference":
        return c.df["split"].isin(["val", "test"]).to_numpy(bool)
    return c.rows()


def shift(cases: list[Cases], cfg) -> tuple[dict | None, dict]:
    """Shift suite (embeddings and outputs) reference vs each target, and each site vs the other sites of
    the same dataset."""
    from medfm.audit.shift import shift_suite

    out, notes = {}, []

    def run(name: str, a: Cases, ma: np.ndarray, b: Cases, mb: np.ndarray) -> None:
        try:
            out[name] = shift_suite(a.feats[ma], b.feats[mb], _prob(a, ma), _prob(b, mb), alpha=cfg.alpha,
                                    n_perm=cfg.n_perm, seed=cfg.seed)
        except MedfmError as e:  # too few cases for one of the tests: say so, keep the others
            notes.append(f"{name}: not tested ({e})")

    ref = cases[0]
    for t in cases[1:]:
        run(f"{ref.name} vs {t.name}", ref, _held(ref), t, t.rows())
    for c in cases:
        m = _held(c)
        if "site" not in c.df:
            continue
        sites = c.df["site"].astype(str).to_numpy()
        present = [s for s in pd.Series(sites[m]).value_counts().index if s not in EMPTY]
        if len(present) < 2:
            continue
        for s in present[:MAX_SITE_PAIRS]:
            run(f"{c.name}: site {s} vs other sites", c, m & (sites == s), c, m & (sites != s))
    if not out:
        return None, {"note": "; ".join(notes) or "one dataset with one site: nothing to compare (give a "
                              "second dataset, or a dataset with a site column)"}
    return out, {"notes": notes}


# ---------------------------------------------------------------- OOD


def ood(cases: list[Cases], cfg, top: int = 8) -> tuple[dict, dict]:
    """Scores fitted on the reference's train features, thresholds on its val cases; every target scored
    (or, with no target, the reference's own test cases as an in-distribution check)."""
    from medfm.audit.ood import fit_gaussian, ood_scores, score_summary

    ref = cases[0]
    tr = ref.rows("train")
    va = ref.rows("val") if ref.rows("val").any() else tr
    y_tr = _labels(ref, tr) if ref.df.loc[tr, "label"].notna().all() else None
    k = int(min(5, tr.sum() - 1))
    targets = [(t, t.rows(), True) for t in cases[1:]] or [(ref, ref.rows("test"), False)]
    g = fit_gaussian(ref.feats[tr], y_tr)
    val_scores = ood_scores(ref.feats[tr], ref.feats[va], y_tr, ref.logits[va], k, g)
    section: dict = {"quantile": 0.95, "k": k, "n_val": int(va.sum()), "n_train": int(tr.sum()),
                     "class_conditional": y_tr is not None, "scores": {}, "targets": {}}
    arrays: dict = {"val": val_scores, "targets": {}}
    for t, m, foreign in targets:
        scores = ood_scores(ref.feats[tr], t.feats[m], y_tr, t.logits[m], k, g)  # one Gaussian, val once
        summary = score_summary(val_scores, scores, 0.95, top, list(t.df.loc[m, "case_id"].astype(str)),
                                foreign)
        label = t.name if foreign else f"{t.name} test (in-distribution check)"
        section["targets"][label] = {"dataset": t.name, "n": int(m.sum()), "foreign": foreign,
                                     "mode": t.mode}
        rows = np.flatnonzero(m)
        for score, entry in summary.items():
            for r in entry["most_atypical"]:  # index into the store, for thumbnails; the id is a hash
                r["row"] = int(rows[r["index"]])
            section["scores"][f"{label} / {score}"] = {"target": label, "score": score, **entry}
        arrays["targets"][label] = (t, scores)
    return section, arrays


# ---------------------------------------------------------------- fairness and calibration


def attribute_values(cases: Sequence[Cases], masks: Sequence[np.ndarray], names: Sequence[str],
                     band_age: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
    """Each requested manifest attribute over the given rows (``age`` -> ``age_band``), plus ``dataset``
    with more than one dataset; attributes absent or empty everywhere are skipped, with a note."""
    from medfm.audit.fairness import age_bands

    out, notes = {}, []
    for name in dict.fromkeys(names):
        if not all(name in c.df for c, m in zip(cases, masks) if m.any()):
            notes.append(f"attribute '{name}' is not a manifest column of every dataset: skipped")
            continue
        vals = np.concatenate([c.df.loc[m, name].to_numpy(object) for c, m in zip(cases, masks)])
        if name == "age" and band_age:
            vals, name = age_bands(vals), "age_band"
        if all(str(v).strip() in EMPTY for v in vals):
            notes.append(f"attribute '{name}' is empty in the data: skipped")
            continue
        out[name] = vals
    if sum(bool(m.any()) for m in masks) > 1:
        out["dataset"] = np.concatenate([np.full(int(m.sum()), c.name, object) for c, m in zip(cases, masks)])
    return out, notes


def pooled(cases: list[Cases]) -> tuple[list[Cases], list[np.ndarray]]:
    """The labelled evaluation rows of every dataset."""
    keep = [(c, c.rows(labelled=True)) for c in cases]
    keep = [(c, m) for c, m in keep if m.any()]
    return [c for c, _ in keep], [m for _, m in keep]


def fairness(cases: list[Cases], threshold: float, cfg) -> tuple[dict | None, dict]:
    from medfm.audit.fairness import fairness_audit

    cs, ms = pooled(cases)
    if not cs:
        return None, {"note": "no labels (monitor mode): fairness needs labels"}
    attrs, notes = attribute_values(cs, ms, cfg.attributes)
    if not attrs:
        return None, {"note": "; ".join(notes) or "no attribute to compare groups by"}
    y = np.concatenate([_labels(c, m) for c, m in zip(cs, ms)])
    p = np.concatenate([_prob(c, m) for c, m in zip(cs, ms)])
    pid = np.concatenate([c.patient_ids(m) for c, m in zip(cs, ms)])
    res = fairness_audit(y, p, attrs, threshold, pid, cfg.min_group, cfg.n_boot, cfg.alpha, cfg.seed)
    return res, {"notes": notes}


def calibration(cases: list[Cases], cfg) -> tuple[dict | None, dict]:
    from medfm.audit.calibration import calibration_audit

    ref = cases[0]
    va = ref.rows("val", labelled=True)
    if not va.any():
        va = ref.rows("train", labelled=True)
    cs, ms = pooled(cases)
    if not cs or not va.any() or not _both_classes(_labels(ref, va)):
        return None, {"note": "calibration needs labelled reference validation cases of both classes"}
    attrs, _ = attribute_values(cs, ms, cfg.attributes)
    z = np.concatenate([c.logits[m] for c, m in zip(cs, ms)])
    y = np.concatenate([_labels(c, m) for c, m in zip(cs, ms)])
    return calibration_audit(ref.logits[va], _labels(ref, va), z, y, attrs, min_size=cfg.min_group), {}


# ---------------------------------------------------------------- shortcut probes


def probes(cases: list[Cases], cfg) -> tuple[dict | None, dict]:
    """Attribute probes on the embeddings of every evaluated case (labelled or not)."""
    from medfm.audit.shortcut import shortcut_audit

    ms = [_held(c) for c in cases]
    attrs, notes = attribute_values(cases, ms, cfg.attributes, band_age=False)  # shortcut_audit bands age
    if not attrs:
        return None, {"note": "; ".join(notes) or "no attribute to probe"}
    feats = np.concatenate([c.feats[m] for c, m in zip(cases, ms)])
    pid = np.concatenate([c.patient_ids(m) for c, m in zip(cases, ms)])
    return shortcut_audit(feats, attrs, pid, n_boot=cfg.n_boot, seed=cfg.seed), {"notes": notes}
