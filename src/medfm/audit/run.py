"""``medfm audit``: one call that audits a classifier on one or more prepared datasets.

::

    from medfm.audit.run import AuditConfig, run_audit
    doc = run_audit("adapt_out/model", ["prepared/shenzhen", "prepared/montgomery"], "audit_out")

``datasets[0]`` is the reference (the model's own data: its train cases fit the OOD model, its val cases
the OOD thresholds and the temperature, its test cases are the internal evaluation); every later dataset
is a target (another site or hospital, a new batch) whose cases all count as external evaluation data. A
dataset without labels is audited in monitor mode (shift and OOD only). Writes, through
``RunDir(out, "audit")``: ``audit.json`` (no identifiers), ``audit.html`` (self-contained), ``figures/``,
``config.json`` and a short ``README.md`` card. ``medfm.load_run(out)`` returns the audit.json document.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfm.audit import model_checks, sections
from medfm.audit.cases import Cases, load_audited_model, load_cases
from medfm.audit.report import assemble_audit, to_jsonable
from medfm.errors import ConfigError, InputError

SECTION_IDS = ("summary", "cross-site", "shift", "ood", "fairness", "calibration", "explanations",
               "shortcuts", "mitigation")


@dataclass
class AuditConfig:
    """What the audit runs. ``attributes``: manifest columns to compare groups by (``age`` is banded);
    ``explain``: saliency methods (None: by encoder family); ``per_site``: train one linear probe per site
    for the train-site x test-site matrix; ``blank_masks``: AUROC with the anatomy blanked where the store
    has masks; ``tent``: test-time BN re-estimation / TENT on each target, before and after."""

    attributes: list[str] = field(default_factory=lambda: ["sex", "age", "site"])
    explain: list[str] | None = None
    n_explain: int = 8
    n_boot: int = 200
    n_perm: int = 200
    min_group: int = 30
    alpha: float = 0.05
    per_site: bool = False
    blank_masks: bool = True
    tent: bool = False
    seed: int = 0
    batch_size: int = 32
    label: str | None = None  # the label audited: of a multi-label classifier, or a CLIP run's finding
    prompts: str | None = None  # a CLIP run's zero-shot prompts: default, attributes or a JSON file

    def check(self) -> None:
        if self.n_boot < 1 or self.n_perm < 1:
            raise ConfigError(f"n_boot and n_perm must be >= 1 (got {self.n_boot}, {self.n_perm})")
        if self.n_explain < 0 or self.min_group < 1 or self.batch_size < 1:
            raise ConfigError("n_explain must be >= 0, min_group and batch_size >= 1")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")


class _Steps:
    """One progress task over the audit's steps (``progress``: a rich Progress, or None)."""

    def __init__(self, progress, total: int) -> None:
        self.p = progress
        self.task = progress.add_task("audit", total=total) if progress else None

    def __call__(self, what: str) -> None:
        if self.p:
            self.p.update(self.task, description=f"audit: {what}")

    def done(self) -> None:
        if self.p:
            self.p.advance(self.task)


def _dataset_info(c: Cases) -> dict:
    df = c.df
    sites = sorted({str(s) for s in df["site"] if str(s) not in sections.EMPTY}) if "site" in df else []
    return {"role": c.role, "mode": c.mode, "n_cases": int(len(df)), "n_evaluated": int(c.rows().sum()),
            "n_labelled": int(c.rows(labelled=True).sum()),
            "splits": {str(k): int(v) for k, v in df["split"].value_counts().sort_index().items()},
            "sites": sites, "has_masks": c.has_masks, "cases_used": "test split" if c.role == "reference"
            else "all cases", "notes": c.notes}


def _model_info(model: Path, conf: Mapping, clf) -> dict:
    enc = conf.get("encoder") or {}
    enc = enc if isinstance(enc, Mapping) else {"name": enc}  # a CLIP run names its encoder by string
    return {"kind": conf.get("kind", "classifier"), "name": model.name,
            "method": conf.get("method") or getattr(clf, "method", None) or None,
            "label": getattr(clf, "label_name", None),
            "encoder": enc.get("name"), "classes": clf.classes, "threshold": clf.threshold,
            "threshold_rule": conf.get("threshold_rule"),
            "training_data": [{k: d.get(k) for k in ("name", "split", "images", "sites")}
                              for d in conf.get("data") or [] if isinstance(d, dict)]}


def _fmt(ci: Mapping | None) -> str:
    if not ci or ci.get("value") is None:
        return "n/a"
    lo, hi = ci.get("lo"), ci.get("hi")
    return f"{ci['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def extra_findings(doc: Mapping) -> list[str]:
    """Flags report.summarize_findings does not raise: monitor-mode datasets, external AUROC drops whose
    CI excludes 0, explanations failing the randomisation test, a model still working with the anatomy
    blanked, mitigation that hurts the source."""
    out = [f"monitor {n}: no labels, shift and OOD only" for n, d in (doc.get("datasets") or {}).items()
           if str(d.get("mode", "")).startswith("monitor")]
    cs = doc.get("cross_site") or {}
    for key in ("by_dataset", "per_site_models"):
        for d in (cs.get(key) or {}).get("drops", []):
            drop = d["auroc_drop"]
            if drop.get("hi") is not None and drop["hi"] < 0:
                size = {"value": -drop["value"], "lo": -drop["hi"], "hi": -drop["lo"]}  # a positive drop
                out.append(f"cross-site {d['train_site']} -> {d['test_site']}: AUROC drops by "
                           f"{_fmt(size)} externally")
    for m, res in ((doc.get("explanations") or {}).get("methods") or {}).items():
        if not res.get("passed_randomisation"):
            out.append(f"explanations {m}: fails the randomisation test (maps barely change with random "
                       "weights; do not read them as the model's reasons)")
    for name, res in ((doc.get("shortcuts") or {}).get("anatomy_blanked") or {}).items():
        if res.get("still_above_chance"):
            out.append(f"shortcut {name}: AUROC {_fmt(res.get('modified'))} with the anatomy blanked (the "
                       "model reads something outside it)")
    for t, res in (doc.get("mitigation") or {}).items():
        for method, r in (res or {}).items():
            if isinstance(r, Mapping) and r.get("applicable"):
                out.append(f"mitigation {method} on {t}: {r.get('reason')}")
    return out


def _explanations(clf, ref: Cases, cfg, figures_dir: Path) -> tuple[dict | None, dict]:
    if not ref.rows(labelled=True).any():
        return None, {"note": "the reference has no labelled test cases (monitor mode): not run"}
    return model_checks.explanations(clf, ref, cfg, figures_dir)


def _shortcuts(clf, cases: list[Cases], cfg) -> tuple[dict | None, dict]:
    """Attribute probes and, where masks exist, the anatomy-blanked AUROC (key ``anatomy_blanked``)."""
    probes, extra = sections.probes(cases, cfg)
    blanked, why = model_checks.anatomy_blanked(clf, cases, cfg)
    res = {**(probes or {}), **({"anatomy_blanked": blanked} if blanked else {})}
    notes = [n for n in (extra.get("note"), *extra.get("notes", [])) if n]
    if not blanked:
        notes.append(f"anatomy-blanked AUROC {why}")
    return (res or None), {"note": "; ".join(notes), "notes": notes}


def _mitigation(clf, cases: list[Cases], cfg) -> tuple[dict | None, dict]:
    res, why = model_checks.mitigation(clf, cases, cfg)
    return res, ({"note": why, "notes": [why]} if why else {})


def run_audit(model: str | Path, datasets: list[str | Path], out: str | Path,
              cfg: AuditConfig | None = None, progress=None) -> dict:
    """Audit the classifier run ``model`` on ``datasets`` (the first is the reference) into ``out``;
    returns the audit.json document. Bad inputs raise a one-line InputError / ConfigError."""
    import torch

    from medfm.audit.html import write_report
    from medfm.rundir import RunDir

    cfg = cfg or AuditConfig()
    cfg.check()
    model, out = Path(model).expanduser(), Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path is a file")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clf, conf = load_audited_model(model, device, cfg.label, cfg.prompts)
    if cfg.n_explain:
        model_checks.resolve_methods(clf, cfg.explain)  # an unknown method fails now, not after the stats
    cases = load_cases(clf, list(datasets), cfg.batch_size, cfg.per_site, progress)
    thr = float(clf.threshold) if isinstance(clf.threshold, int | float) else 0.5
    run = RunDir(out, "audit")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    steps = _Steps(progress, 9 + int(cfg.per_site))
    notes: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    found: dict[str, Any] = {}

    def section(name: str, fn, *args) -> None:
        steps(name.replace("_", " "))
        res, extra = fn(*args)
        found[name], arrays[name] = res, extra
        if res is None:
            notes[name] = extra.get("note", "nothing to show")
        elif extra.get("notes"):
            notes[name] = "; ".join(extra["notes"])
        steps.done()

    site_clfs: list = []
    if cfg.per_site:
        steps("per-site models")
        site_clfs, site_notes = model_checks.site_models(clf, cases, cfg, progress)
        if site_notes:
            notes["per_site_models"] = "; ".join(site_notes)
        steps.done()
    section("cross_site", sections.performance, cases, thr, cfg, site_clfs)
    section("shift", sections.shift, cases, cfg)
    section("ood", sections.ood, cases, cfg)
    section("fairness", sections.fairness, cases, thr, cfg)
    section("calibration", sections.calibration, cases, cfg)
    section("explanations", _explanations, clf, cases[0], cfg, out / "figures")
    section("shortcuts", _shortcuts, clf, cases, cfg)
    section("mitigation", _mitigation, clf, cases, cfg)

    settings = {**dataclasses.asdict(cfg), "device": device, "threshold": thr}
    doc = assemble_audit(model=_model_info(model, conf, clf),
                         datasets={c.name: _dataset_info(c) for c in cases}, settings=settings, **found)
    doc["findings"] = [*doc["findings"], *extra_findings(doc)]
    doc["notes"] = to_jsonable(notes)
    steps("report")
    run.write_config({"model": str(model), "datasets": [str(c.path) for c in cases], "settings": settings,
                      "data": conf.get("data") or [], "preprocessing": conf.get("preprocessing"),
                      "audited": list(doc["datasets"])})
    run.write_json("audit.json", doc)
    write_report(doc, arrays, run)
    run.write_metrics(summary_metrics(doc), merge=False)
    from medfm.audit import card  # noqa: F401  (registers the "audit" card section)

    run.write_card()
    steps.done()
    return doc


def summary_metrics(doc: Mapping) -> dict:
    """metrics.json: the headline numbers (AUROC per dataset, findings count)."""
    out: dict = {"n_findings": len(doc.get("findings", []))}
    for cell in ((doc.get("cross_site") or {}).get("by_dataset") or {}).get("cells", []):
        out[f"auroc_{cell['test_site']}"] = cell["auroc"]["value"]
    return out


def load_audit(path: str | Path) -> dict:
    """An audit run (``medfm audit``): its audit.json document."""
    from medfm.rundir import read_json

    p = Path(path) / "audit.json"
    if not p.is_file():
        raise InputError(path, "audit run has no audit.json (did the audit finish?)")
    return read_json(p)
