"""The audit sections that run the model again on images: explanations with their sanity checks, the
anatomy-blanked AUROC, test-time mitigation, and the per-site models of the cross-site matrix.

Blanking (``medfm.audit.blank``) and mitigation (``medfm.audit.mitigate``) are optional modules: when one
is not installed the section says "not run" and why, instead of failing the audit.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfm.audit.cases import Cases, as_float, images_of
from medfm.errors import MedfmError

# CLI spellings -> registered saliency names
METHOD_ALIASES = {"ig": "integrated_gradients", "gradcampp": "gradcam++", "gradcam_pp": "gradcam++",
                  "attention": "rollout", "attention_rollout": "rollout"}


def _optional(module: str) -> tuple[Any, str | None]:
    try:
        return importlib.import_module(module), None
    except ImportError as e:
        return None, f"not run: {module} is not available ({e})"


def resolve_methods(clf, names: list[str] | None) -> list[str]:
    """Saliency methods to run: the given ones (aliases resolved, checked), or by encoder family the
    architecture's own method (Grad-CAM for CNNs, rollout for ViTs) plus integrated gradients."""
    from medfm.audit.explain import find_encoder, list_methods, methods_for
    from medfm.errors import ConfigError

    if names:
        out = [METHOD_ALIASES.get(n.strip().lower(), n.strip().lower()) for n in names if n.strip()]
        unknown = [n for n in out if n not in list_methods()]
        if unknown:
            raise ConfigError(f"unknown explanation method(s) {unknown}; known: "
                              f"{', '.join(list_methods())} (ig = integrated_gradients)")
        return list(dict.fromkeys(out))
    fitting = methods_for(find_encoder(clf))
    return [fitting[0], "integrated_gradients"] if fitting[0] != "integrated_gradients" else fitting[:1]


def _pick(ref: Cases, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` test rows, positives and negatives alternating where both exist (seeded)."""
    rng = np.random.default_rng(seed)
    test = np.flatnonzero(ref.rows())
    lab = ref.df["label"].to_numpy(float)[test]
    pos, neg = rng.permutation(test[lab == 1]), rng.permutation(test[lab != 1])
    out = [v for pair in zip(pos, neg) for v in pair]
    rest = [v for v in np.r_[pos[len(out) // 2:], neg[len(out) // 2:]]]
    return np.array((out + rest)[:n], dtype=int)


def explanations(clf, ref: Cases, cfg, figures_dir: Path) -> tuple[dict | None, dict]:
    """Saliency maps on ``cfg.n_explain`` reference test cases, each method's cascading randomisation test,
    localisation against the store's masks; overlay PNG in ``figures_dir``."""
    from medfm.audit.explain_audit import audit_explanations
    from medfm.audit.explain_figures import save_overlay

    if cfg.n_explain <= 0:
        return None, {"note": "not run (n_explain = 0)"}
    rows = _pick(ref, cfg.n_explain, cfg.seed)
    if not len(rows):
        return None, {"note": "the reference has no test cases to explain"}
    kinds = resolve_methods(clf, cfg.explain)
    imgs, masks = images_of(ref, rows)
    x = as_float(imgs)
    options = {"integrated_gradients": {"n_steps": 16}}
    audit = audit_explanations(clf, x, masks=masks, kinds=kinds, seed=cfg.seed,
                               sanity_cases=min(len(rows), 8),
                               options={k: v for k, v in options.items() if k in kinds})
    ids = list(ref.df["case_id"].astype(str).to_numpy()[rows])
    show = min(len(rows), 6)
    save_overlay(figures_dir / "explanations.png", x[:show], {k: v[:show] for k, v in audit.maps.items()},
                 masks=None if masks is None else torch.as_tensor(masks[:show]),
                 row_titles=[i[:10] for i in ids[:show]])
    out = {"n_cases": len(rows), "case_ids": ids, "dataset": ref.name, "methods_run": kinds,
           "masks": masks is not None, **audit.to_dict()}
    if masks is None:
        out["localisation_note"] = "the store has no masks: localisation not measured"
    return out, {"overlay": "explanations.png"}


def anatomy_blanked(clf, cases: list[Cases], cfg) -> tuple[dict | None, str | None]:
    """Per labelled dataset with masks: AUROC on the original vs the anatomy-blanked evaluation images
    (``medfm.audit.blank.blanked_auroc``: paired, patient-level CI)."""
    if not cfg.blank_masks:
        return None, "not run (blank_masks off)"
    with_masks = [c for c in cases if c.has_masks and c.labelled]
    if not with_masks:
        return None, "not run: no labelled dataset has masks"
    blank, why = _optional("medfm.audit.blank")
    if blank is None:
        return None, why
    out = {}
    for c in with_masks:
        m = c.rows(labelled=True)
        if "has_mask" in c.df:
            m &= c.df["has_mask"].fillna(False).to_numpy(bool)
        rows = np.flatnonzero(m)
        if not len(rows):
            continue
        imgs, masks = images_of(c, rows)
        if masks is None:
            continue
        out[c.name] = blank.blanked_auroc(clf, imgs, masks, c.df["label"].to_numpy(float)[rows],
                                          patient_ids=c.patient_ids(m), n_boot=cfg.n_boot, alpha=cfg.alpha,
                                          batch_size=cfg.batch_size, seed=cfg.seed)
    return (out or None), (None if out else "not run: no labelled case has a mask")


def mitigation(clf, cases: list[Cases], cfg) -> tuple[dict | None, str | None]:
    """BN re-estimation and TENT on each target (``medfm.audit.mitigate.mitigation_report``): AUROC before
    and after on the target (where labelled) and on the reference test split, which must not drop by more
    than 0.01 for the adapted model to be accepted."""
    if not cfg.tent:
        return None, "not run (enable with --tent: test-time BN re-estimation and entropy minimisation)"
    mitigate, why = _optional("medfm.audit.mitigate")
    if mitigate is None:
        return None, why
    targets = cases[1:]
    if not targets:
        return None, "not run: mitigation adapts to a target dataset; give one after the reference"
    ref = cases[0]
    m = ref.rows(labelled=True)
    if not m.any():
        return None, "not run: the reference has no labelled test cases for the source guard"
    ref_imgs, _ = images_of(ref, np.flatnonzero(m))
    source = (ref_imgs, ref.df["label"].to_numpy(float)[m], ref.patient_ids(m))
    # the audited model's own probabilities: the same for every target and method (adapting copies it)
    s0 = mitigate.probabilities(clf, ref_imgs, cfg.batch_size)
    out = {}
    for t in targets:
        mt = t.rows()
        imgs, _ = images_of(t, np.flatnonzero(mt))
        target = (imgs, t.df["label"].to_numpy(float)[mt], t.patient_ids(mt)) if t.labelled else imgs
        original = (s0, mitigate.probabilities(clf, imgs, cfg.batch_size))
        res = {}
        for method in mitigate.METHODS:
            try:
                res[method] = mitigate.mitigation_report(clf, source, target, method, n_boot=cfg.n_boot,
                                                         batch_size=cfg.batch_size, seed=cfg.seed,
                                                         original=original).to_dict()
            except MedfmError as e:
                res[method] = {"method": method, "applicable": False, "reason": f"not run: {e}"}
        out[t.name] = res
    return out, None


def site_models(clf, cases: list[Cases], cfg, progress=None) -> tuple[list[tuple[str, Any]], list[str]]:
    """One linear-probe model per site of every labelled dataset (its train split), on the audited
    model's encoder: the rows of the train-site x test-site matrix. Sites that cannot train are noted."""
    from medfm.tasks.adapt.single import fit_classifier

    jobs = []
    for c in cases:
        tr = c.rows("train", labelled=True)
        if not tr.any() or "site" not in c.df:
            continue
        for s in sorted(c.df.loc[tr, "site"].astype(str).unique()):
            jobs.append((c, s))
    task = progress.add_task("per-site models", total=len(jobs)) if progress else None
    models, notes = [], []
    for c, s in jobs:
        try:
            models.append((f"{c.name}/{s}", fit_classifier(copy.deepcopy(clf.encoder), c.path, None,
                                                           method="linear", seed=cfg.seed, sites=[s])))
        except (MedfmError, ValueError) as e:  # e.g. a site whose train split holds one class
            notes.append(f"site model {c.name}/{s}: not trained ({e})")
        if progress:
            progress.advance(task)
    return models, notes
