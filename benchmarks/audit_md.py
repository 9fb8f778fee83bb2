"""benchmarks/results/audit_bench.{json,md}: the numbers of bench_audit.py as JSON and as readable tables."""

from __future__ import annotations

import json
from pathlib import Path


def f(d, nd: int = 3) -> str:
    """'v [lo, hi]' of a CI dict, a plain number, or n/a."""
    if d is None:
        return "n/a"
    if isinstance(d, dict):
        v, lo, hi = d.get("value"), d.get("lo"), d.get("hi")
        if v is None:
            return "n/a"
        if lo is None or hi is None:
            return f"{v:.{nd}f}"
        return f"{v:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]"
    if isinstance(d, bool):
        return "yes" if d else "no"
    return f"{d:.{nd}g}" if isinstance(d, float) else str(d)


def _tb(tb: dict) -> list[str]:
    out = ["## Tuberculosis, two hospitals (cxr_lung_seg)", "",
           "| direction | internal AUROC | external AUROC | external − internal | hospital probe AUROC | "
           "MMD p | KS p | domain-classifier p | lung blanked AUROC |",
           "|---|---|---|---|---|---|---|---|---|"]
    for k in ("shenzhen_to_montgomery", "montgomery_to_shenzhen"):
        r = tb.get(k)
        if not r:
            continue
        bl = (r.get("lung_blanked") or {}).get("modified")
        out.append(f"| {k.replace('_to_', ' → ')} (n {r['n_internal']} / {r['n_external']}) | "
                   f"{f(r['internal_auroc'])} | {f(r['external_auroc'])} | "
                   f"{f(r['auroc_drop_external_minus_internal'])} | {f(r['hospital_probe_auroc'])} | "
                   f"{f(r['mmd_p'])} | {f(r['ks_p'])} | {f(r['domain_classifier_p'])} | {f(bl)} |")
    fpr = tb.get("same_site_shift_fpr")
    if fpr:
        out += ["", f"Same-site false-positive rate (Shenzhen, {fpr['n_splits']} random patient-level "
                f"halves, "
                f"α = {fpr['alpha']}): MMD {fpr['mmd_fpr']:.2f}, KS (32 PCA comps, Bonferroni) "
                f"{fpr['ks_fpr']:.2f}; an exactly calibrated test rejects at most "
                f"{fpr['max_rejections_if_calibrated_95']} of {fpr['n_splits']} (95 %)."]
    out += ["", "Explanations (model's own test cases; lung masks; cascading randomisation):", "",
            "| model | method | mass in lung | area baseline | ratio | pointing game (chance) | "
            "final rank corr. (randomised) | passes |", "|---|---|---|---|---|---|---|---|"]
    for k in ("shenzhen_to_montgomery", "montgomery_to_shenzhen"):
        for m, e in ((tb.get(k) or {}).get("explanations") or {}).items():
            out.append(f"| {k.split('_to_')[0]} | {m} | {f(e['mass_in_mask'])} | {f(e['area_share'])} | "
                       f"{f(e['mass_ratio'])} | {f(e['pointing_game'])} ({f(e['pointing_chance'])}) | "
                       f"{f(e['final_spearman'])} | {f(e['passed_randomisation'])} |")
    out += ["", "Randomisation steps (rank correlation trained vs randomised map, head first):", ""]
    for k in ("shenzhen_to_montgomery", "montgomery_to_shenzhen"):
        for m, e in ((tb.get(k) or {}).get("explanations") or {}).items():
            steps = ", ".join(f"{n} {v:.2f}" for n, v in e["spearman_by_step"])
            out.append(f"- {k.split('_to_')[0]} {m}: {steps}")
    return out


def _ood(tb: dict) -> list[str]:
    out = ["## OOD: AUROC of each per-case score (validation of the reference vs target)", "",
           "| reference → target | mahalanobis | energy | knn |", "|---|---|---|---|"]
    rows = [("Shenzhen CXR → BreastMNIST ultrasound", tb.get("ood_breastmnist_vs_cxr")),
            ("Shenzhen → Montgomery", (tb.get("shenzhen_to_montgomery") or {}).get("ood_site_vs_site")),
            ("Montgomery → Shenzhen", (tb.get("montgomery_to_shenzhen") or {}).get("ood_site_vs_site"))]
    for name, r in rows:
        if r:
            out.append(f"| {name} | " + " | ".join(f(r.get(s, {}).get("auroc")) for s in
                                                   ("mahalanobis", "energy", "knn")) + " |")
    return out


def _covid(c: dict) -> list[str]:
    out = ["## COVID CXR with notes: subgroups (COVID-19 vs other findings, linear probe, test split)", "",
           f"Internal test AUROC {f(c['internal_auroc'])} on {c['n_test']} cases. Groups under "
           f"{c['min_group']} cases are flagged (too small), not ranked.", "",
           "| attribute | group | n | positives | AUROC | FNR | FPR | FNR gap vs reference | too small |",
           "|---|---|---|---|---|---|---|---|---|"]
    hidden = []
    for attr, t in c["attributes"].items():
        for g in t["groups"]:
            if g["n"] < 5:  # dozens of one-case hospitals: counted below, listed in the JSON
                hidden.append(g)
                continue
            out.append(f"| {attr} | {g['group']} | {g['n']} | {g['n_pos']} | {f(g['auroc'])} | "
                       f"{f(g['fnr'])} | "
                       f"{f(g['fpr'])} | {f(g['fnr_gap'])} | {f(g['too_small'])} |")
    if hidden:
        out += ["", f"Not listed: {len(hidden)} groups with fewer than 5 test cases ("
                f"{sum(g['n'] for g in hidden)} cases; all flagged too small, see the JSON)."]
    return out


def _phantom(p: dict) -> list[str]:
    t = p["flip_truth"]
    out = ["## Phantom: planted ground truth", "",
           f"(a) {t['group_column']} = {t['group_value']}: positives flipped to negative at rate "
           f"{t['rate']} in "
           f"{', '.join(t['splits'])} (achieved: " + ", ".join(
               f"{s} {v['flipped']}/{v['positives']}" for s, v in t["per_split"].items()) + ").", "",
           "| model | audit FNR site_a | audit FNR gap a − b (CI) | population gap (4000 cases) | "
           "within ±0.05 | CI excludes 0 |", "|---|---|---|---|---|---|"]
    for k in ("flip_clean", "flip_flipped"):
        r = p[k]
        out.append(f"| {k.split('_')[1]} | {f(r['audit_fnr_site_a'])} | {f(r['audit_fnr_gap_a_minus_b'])} | "
                   f"{r['population_fnr_gap']:.3f} | {f(r['within_0.05'])} | {f(r['ci_excludes_0'])} |")
    c, fl = p["flip_clean"], p["flip_flipped"]
    added = fl["audit_fnr_gap_a_minus_b"]["value"] - c["audit_fnr_gap_a_minus_b"]["value"]
    out += ["", f"Gap added by the flips (flipped − clean model): audit {added:.3f}, population "
            f"{fl['population_fnr_gap'] - c['population_fnr_gap']:.3f} (thresholds "
            f"{c['threshold']:.3f} / {fl['threshold']:.3f}, Youden on each model's val)."]
    m = p["site_marker"]
    out += ["", "(b) Site marker (corner square; label-correlated in train/val, independent in test): "
            f"site probe AUROC {f(m['probe_auroc_site_from_embeddings'])} "
            f"(flagged: {f(m['probe_flagged'])}); "
            f"test AUROC {f(m['test_auroc_marker_model'])} vs {f(m['test_auroc_clean_model'])} without the "
            f"marker; FNR plain {f(m['fnr_plain'])} vs marked {f(m['fnr_marked'])}; FPR marked "
            f"{f(m['fpr_marked'])} vs plain {f(m['fpr_plain'])}. "
            f"Shortcut flagged: **{f(m['flagged'])}**.", "",
            "(c) Pointing game on each finding's own mask (positive test cases):", "",
            "| finding | method | pointing game | chance | mass ratio | n | final rank corr. |",
            "|---|---|---|---|---|---|---|"]
    for fnd, methods in p["pointing_game"].items():
        for meth, r in methods.items():
            out.append(f"| {fnd} | {meth} | {f(r['pointing_game'])} | {f(r['pointing_chance'])} | "
                       f"{f(r['mass_ratio'])} | {r['n']} | {f(r['randomisation_final_spearman'])} |")
    sup = p.get("pointing_game_supervised")
    if sup:
        out += ["", "(c2) The same pointing game for a model that has learnt each finding: ResNet-18 "
                "(width 16) trained from scratch on it (AUROC is its test AUROC):", "",
                "| finding | test AUROC | method | pointing game | chance | mass ratio | n | final rank "
                "corr. |",
                "|---|---|---|---|---|---|---|---|"]
        for fnd, res in sup.items():
            for meth, r in res.items():
                if isinstance(r, dict):
                    out.append(f"| {fnd} | {f(res['test_auroc'])} | {meth} | {f(r['pointing_game'])} | "
                               f"{f(r['pointing_chance'])} | {f(r['mass_ratio'])} | {r['n']} | "
                               f"{f(r['randomisation_final_spearman'])} |")
    return out


def write(out_dir: Path, name: str, res: dict, meta: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps({"benchmark": name, **meta, "results": res}, indent=2, default=str))
    lines = [f"# {name}", "", f"Command: `{meta['command']}`", "", f"Encoder: {meta['encoder']}.",
             f"Wall time {meta['wall_s']} s, {meta['threads']} threads, {meta['machine']}; bootstrap "
             f"{meta['n_boot']}, permutations {meta['n_perm']}.", ""]
    if "tb" in res:
        lines += _tb(res["tb"]) + [""] + _ood(res["tb"]) + [""]
    if "covid" in res:
        lines += _covid(res["covid"]) + [""]
    if "phantom" in res:
        lines += _phantom(res["phantom"]) + [""]
    md.write_text("\n".join(lines))
    return js, md
