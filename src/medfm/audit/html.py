"""audit.html: one self-contained page a clinician can read top-down. The summary comes first (plain
language flags), then one ``<section id=...>`` per part of the audit, in the order of
``medfm.audit.run.SECTION_IDS``; a part with nothing to show says why. Figures are embedded as base64 PNG
and also kept in ``figures/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from medfm.audit import figures
from medfm.eval.html import Report

INTRO = {
    "summary": "This page checks whether the model can be trusted on the data below before it is used on "
               "patients. Flags first; each section then explains one check. 95% confidence intervals "
               "are in brackets; they resample patients, not images.",
    "cross-site": "Performance on each dataset and site. 'Internal' is the model's own held-out test data; "
                  "a model that is much worse on another hospital's data (the drop) does not transfer.",
    "shift": "Do the datasets differ? Tests compare the model's internal image features and its outputs "
             "between datasets or sites. A small p-value (below alpha) means a real difference; 'cases "
             "needed' is roughly how many cases per side reveal it.",
    "ood": "Per-case 'atypicality' scores: how unlike the model's training data each case is. The "
           "threshold flags about 5% of ordinary cases; a target with many more flagged cases is "
           "outside what the model knows.",
    "fairness": "Errors per patient group. FNR is the share of true positives the model misses "
                "(underdiagnosis); FPR the share of negatives it flags. Gaps are against the largest "
                "group; groups that are too small are shown but not ranked.",
    "calibration": "When the model says 80%, is the finding present about 80% of the time? ECE is the "
                   "average mismatch. Temperature scaling (fitted on validation data) can fix "
                   "over-confidence without changing which cases rank higher.",
    "explanations": "Heat maps of where the model looks, shown only with their sanity checks: a method "
                    "whose maps do not change when the model's weights are randomised is not explaining "
                    "the model. Where masks exist, maps are scored against them versus chance.",
    "shortcuts": "Can the model's features tell the hospital, sex or age? If so, a model may use them "
                 "instead of the disease. With the anatomy blanked out, a model should be near chance.",
    "mitigation": "Test-time adaptation on the new site (batch-norm re-estimation, entropy minimisation), "
                  "measured before and after; it must not hurt the original site.",
}


# What each kind of flag means for a reader who is not a statistician (keyed by the flag's first word).
PLAIN = {
    "cross-site": "the model is measurably worse on another hospital's data than on its own",
    "shift": "the images (or the model's outputs) differ between these datasets or sites",
    "ood": "many cases look unlike anything the model was trained on; its outputs there are less reliable",
    "fairness": "the model misses more (or fewer) true positives in this patient group",
    "shortcut": "the model's features encode this attribute, or it scores without the anatomy: it may "
                "rely on something other than the disease",
    "calibration": "the stated probabilities do not match how often the finding is present",
    "explanations": "this heat-map method is not trustworthy for this model",
    "monitor": "this dataset has no labels, so only shift and atypical cases were checked",
    "mitigation": "result of adapting the model to the new site, and whether it was kept",
}


def plain(flag: str) -> str:
    """The plain-language reading of one finding."""
    if flag.startswith("fairness") and "not ranked" in flag:
        return "some groups are too small to judge: their numbers are shown, not compared"
    return PLAIN.get(flag.split(" ")[0].rstrip(":"), "")


def _ci(d: Mapping | None) -> str:
    if not isinstance(d, Mapping) or d.get("value") is None:
        return "–"
    lo, hi = d.get("lo"), d.get("hi")
    return f"{d['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def _p(v: Any) -> str:
    return "–" if v is None else (f"{v:.2g}" if v < 0.001 else f"{v:.3f}")


class _Page:
    def __init__(self, doc: Mapping, run) -> None:
        self.doc, self.run = doc, run
        self.r = Report("Trust audit", subtitle=f"model {doc['model'].get('name')} · "
                        f"{len(doc['datasets'])} dataset(s) · medfm audit")
        self.notes = doc.get("notes") or {}

    def figure(self, fig, name: str, caption: str) -> None:
        path = self.run.save_figure(fig, f"figures/{name}.png")
        self.r.add_image(path.read_bytes(), caption)

    def image(self, name: str, caption: str) -> None:
        p = self.run.path / "figures" / name
        if p.is_file():
            self.r.add_image(p.read_bytes(), caption)

    def open(self, sid: str, title: str, key: str | None = None) -> bool:
        self.r.add_html(f'<section id="{sid}">')
        self.r.add_heading(title)
        self.r.add_text(INTRO[sid])
        key = key or sid.replace("-", "_")
        if self.doc.get(key) is None and sid != "summary":
            self.r.add_note(f"Nothing to show: {self.notes.get(key, 'not run')}")
            return False
        if self.notes.get(key):
            self.r.add_note(str(self.notes[key]))
        return True

    def close(self) -> None:
        self.r.add_html("</section>")

    def table(self, rows: list[dict], caption: str | None = None) -> None:
        if rows:
            self.r.add_table(pd.DataFrame(rows), caption=caption)


def _summary(pg: _Page) -> None:
    d = pg.doc
    pg.open("summary", "Summary")
    flags = d.get("findings") or []
    if flags:
        pg.r.add_heading("Flags", 3)
        pg.table([{"flag": f, "what it means": plain(f)} for f in flags])
    else:
        pg.r.add_note("No flags raised by the checks that ran.")
    m = d["model"]
    kv = {"model": m.get("name"), "kind": m.get("kind"), "encoder": m.get("encoder"),
          "method": m.get("method"), "finding audited": m.get("label"),
          "classes": ", ".join(m.get("classes") or []),
          "decision threshold": m.get("threshold"), "sections run": ", ".join(d.get("sections", []))}
    pg.r.add_kv({k: v for k, v in kv.items() if v is not None})
    pg.table([{"dataset": n, "role": i["role"], "mode": i["mode"], "cases used": i["cases_used"],
               "evaluated": i["n_evaluated"], "labelled": i["n_labelled"], "sites": ", ".join(i["sites"])}
              for n, i in d["datasets"].items()], "Datasets (the first is the reference)")
    cells = ((d.get("cross_site") or {}).get("by_dataset") or {}).get("cells", [])
    pg.table([{"dataset": c["test_site"], "internal": "yes" if c["internal"] else "", "n": c["n"],
               "AUROC": _ci(c["auroc"]),
               "sensitivity": _ci(c["sensitivity"]), "specificity": _ci(c["specificity"])} for c in cells],
             "Headline performance")
    for i in d["datasets"].values():
        for note in i.get("notes") or []:
            pg.r.add_note(note)
    pg.close()


def _matrix_tables(pg: _Page, mat: Mapping, what: str, heatmap: str | None) -> None:
    def internal(c: Mapping) -> dict:
        return {"internal": "yes" if c["internal"] else ""} if heatmap else {}

    pg.table([{"model": c["train_site"], "test": c["test_site"], **internal(c), "n": c["n"],
               "positives": c["n_pos"], "AUROC": _ci(c["auroc"]), "sensitivity": _ci(c["sensitivity"]),
               "specificity": _ci(c["specificity"]), "ECE": _ci(c["ece"])} for c in mat["cells"]], what)
    pg.table([{"model": x["train_site"], "test": x["test_site"], "AUROC external - internal":
               _ci(x["auroc_drop"])} for x in mat.get("drops", [])], "Internal to external change")
    if heatmap:
        pg.figure(figures.cross_site_heatmap(mat), heatmap, what)


def _cross_site(pg: _Page) -> None:
    if pg.open("cross-site", "Cross-site performance"):
        cs = pg.doc["cross_site"]
        for key, what, fig in (("by_dataset", "By dataset", "cross_site_datasets"),
                               ("by_site", "By site", None),
                               ("per_site_models", "Per-site models: train site x test site",
                                "cross_site_matrix")):
            if cs.get(key):
                _matrix_tables(pg, cs[key], what, fig)
        for n in cs.get("notes") or []:
            pg.r.add_note(n)
    pg.close()


def _shift(pg: _Page) -> None:
    if pg.open("shift", "Dataset shift"):
        rows = []
        for pair, t in pg.doc["shift"].items():
            def get(k: str, f: str = "p_value", t: Mapping = t) -> Any:
                return (t.get(k) or {}).get(f)

            rows.append({"comparison": pair, "MMD p": _p(get("mmd")), "KS p (Bonferroni)": _p(get("ks")),
                         "domain classifier AUROC": _p(get("domain_classifier", "statistic")),
                         "domain classifier p": _p(get("domain_classifier")),
                         "output KS p": _p(get("softmax_ks")),
                         "predicted-class p": _p(get("predicted_class")),
                         "shift detected": "yes" if t.get("any_detected") else "no",
                         "cases needed (MMD)": ((t.get("mmd") or {}).get("sample_size") or {}).get("n_needed")
                         or "> available"})
        pg.table(rows, "Shift tests (detected: any test below alpha / number of tests)")
    pg.close()


def _ood(pg: _Page, arrays: Mapping) -> None:
    from medfm.audit.cases import images_of

    if pg.open("ood", "Out-of-distribution cases"):
        o = pg.doc["ood"]
        pg.table([{"target": e["target"], "score": e["score"], "threshold": e["threshold"],
                   "flagged": f"{e['flagged_fraction']:.1%}",
                   "flagged on val": f"{e['val_flagged_fraction']:.1%}",
                   "AUROC target vs reference": e.get("auroc")} for e in o["scores"].values()],
                 f"Scores fitted on {o['n_train']} reference training cases; thresholds at the 95th "
                 f"percentile of {o['n_val']} validation cases")
        val = arrays.get("val") or {}
        for i, (label, (cases, scores)) in enumerate((arrays.get("targets") or {}).items()):
            thr = {e["score"]: e["threshold"] for e in o["scores"].values() if e["target"] == label}
            pg.figure(figures.ood_histograms(val, scores, thr, label), f"ood_hist_{i}", f"Scores: {label}")
            top = (o["scores"].get(f"{label} / mahalanobis") or {}).get("most_atypical", [])[:8]
            if top:
                imgs, _ = images_of(cases, np.array([r["row"] for r in top]))
                titles = [f"{str(r.get('case_id', ''))[:10]}\n{r['score']:.1f}" for r in top]
                pg.figure(figures.atypical_thumbnails(list(imgs), titles), f"ood_atypical_{i}",
                          f"Most atypical cases of {label} (Mahalanobis; case ids are hashed)")
    pg.close()


def _fairness(pg: _Page) -> None:
    if pg.open("fairness", "Fairness across patient groups"):
        for i, (attr, res) in enumerate(pg.doc["fairness"].items()):
            pg.r.add_heading(attr, 3)
            pg.table([{"group": g["group"], "n": g["n"], "positives": g["n_pos"],
                       "too small": "yes" if g["too_small"] else "", "AUROC": _ci(g["auroc"]),
                       "FNR": _ci(g["fnr"]), "FPR": _ci(g["fpr"]), "ECE": _ci(g["ece"]),
                       "FNR gap": _ci((g.get("gap") or {}).get("fnr")), "FNR rank": g.get("fnr_rank") or ""}
                      for g in res["groups"]],
                     f"reference group: {res['reference']}; equalized-odds difference "
                     f"{_p(res.get('equalized_odds_difference'))}, demographic-parity difference "
                     f"{_p(res.get('demographic_parity_difference'))}")
            pg.figure(figures.fairness_bars(res, attr), f"fairness_{i}", f"{attr}: per-group metrics")
    pg.close()


def _calibration(pg: _Page) -> None:
    if pg.open("calibration", "Calibration"):
        c = pg.doc["calibration"]
        pg.r.add_kv({"temperature (fitted on reference val)": c["temperature"],
                     "ECE before": c["before"]["ece"], "ECE after": c["after"]["ece"],
                     "NLL before": c["before"].get("nll"), "NLL after": c["after"].get("nll"),
                     "cases": c["n_test"]})
        pg.figure(figures.reliability_before_after(c), "reliability", "Reliability before / after")
        rows = [{"attribute": a, "group": g, "n": r["n"], "too small": "yes" if r["too_small"] else "",
                 "ECE before": r["before"]["ece"], "ECE after": r["after"]["ece"]}
                for a, groups in c.get("by_group", {}).items() for g, r in groups.items()]
        pg.table(rows, "ECE per group")
    pg.close()


def _explanations(pg: _Page) -> None:
    if pg.open("explanations", "Explanations and their sanity checks"):
        e = pg.doc["explanations"]
        rows = []
        for m, r in e["methods"].items():
            loc = r.get("localisation") or {}
            verdict = "passes" if r["passed_randomisation"] else "FAILS"
            rows.append({"method": m, "randomisation test": verdict,
                         "final rank correlation": r["randomisation"]["final_spearman"],
                         "pointing game": loc.get("pointing_game"), "chance": loc.get("pointing_chance"),
                         "saliency in mask": loc.get("mass_in_mask"), "mask area": loc.get("area_share")})
        pg.table(rows, f"{e['n_cases']} test cases of {e['dataset']}")
        if e.get("localisation_note"):
            pg.r.add_note(e["localisation_note"])
        pg.image("explanations.png", "Saliency overlays (first column: image; case ids hashed)")
        pg.figure(figures.randomisation_curves(e["methods"]), "randomisation", "Randomisation test")
    pg.close()


def _shortcuts(pg: _Page) -> None:
    if pg.open("shortcuts", "Shortcuts"):
        s = dict(pg.doc["shortcuts"])
        blanked = s.pop("anatomy_blanked", None)
        pg.table([{"attribute": a, "probe AUROC": _ci(r.get("auroc")), "predictable": "yes" if
                   r.get("predictable") else "no", "cases": r.get("n"), "note": r.get("note", "")}
                  for a, r in s.items()], "Attribute predicted from the embeddings (0.5 = chance)")
        if blanked:
            pg.table([{"dataset": n, "cases": r.get("n"), "AUROC original": _ci(r.get("original")),
                       "AUROC anatomy blanked": _ci(r.get("modified")), "change": _ci(r.get("difference")),
                       "reading": r.get("interpretation", "")}
                      for n, r in blanked.items()], "Anatomy blanked (masked region filled)")
    pg.close()


def _mitigation(pg: _Page) -> None:
    if pg.open("mitigation", "Mitigation"):
        rows = []
        for t, res in pg.doc["mitigation"].items():
            for method, r in res.items():
                tg, src = r.get("target") or {}, r.get("source") or {}
                name = {"bn": "BN re-estimation", "tent": "TENT"}.get(method, method)
                rows.append({"target": t, "method": name,
                             "target AUROC before": _ci(tg.get("original")), "after": _ci(tg.get("adapted")),
                             "source AUROC before": _ci(src.get("original")),
                             "source after": _ci(src.get("adapted")),
                             "kept": "yes" if r.get("accepted") else "no", "why": r.get("reason", "")})
        pg.table(rows, "AUROC before / after adaptation; the adapted model is kept only if the source "
                       "AUROC stays within 0.01")
    pg.close()


def write_report(doc: Mapping, arrays: Mapping, run) -> Any:
    """Render audit.html (and its figures) into the run directory; returns its path."""
    pg = _Page(doc, run)
    _summary(pg)
    _cross_site(pg)
    _shift(pg)
    _ood(pg, arrays.get("ood") or {})
    _fairness(pg)
    _calibration(pg)
    _explanations(pg)
    _shortcuts(pg)
    _mitigation(pg)
    return run.write_text("audit.html", pg.r.to_html())
