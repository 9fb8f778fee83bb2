"""Trust audit (issue 18 "Must show"), measured through `medfm.audit.run.run_audit` on real and planted data.

    .venv/bin/python benchmarks/bench_audit.py [--work benchmarks/work/audit] [--parts tb,ood,covid,phantom]

Encoder: one small MAE (vit_tiny, 4 blocks x 128, patch 8, 64 px) pretrained with medfm.train on the train
splits of the TB, COVID and phantom stores (labels unused); every model audited is a linear probe on it
(`fit_classifier(method="linear")`), so no step trains an encoder on labels. Parts:

- tb: Shenzhen and Montgomery models, each audited on its own test split (internal) and the other hospital
  (external) plus BreastMNIST ultrasound (unlabelled, OOD); same-site shift false-positive rate over
  random patient-level halves of Shenzhen.
- covid: subgroup table by sex, age band and hospital (location).
- phantom: (a) site_a positives flipped to negative at a known rate in train/val; the FNR gap the audit
  reports on the test split vs the gap of the same model on an independent 4000-case phantom population;
  (b) planted corner marker following the label in train/val only; (c) pointing game per finding.

Writes benchmarks/results/audit_bench.{json,md}; everything expensive is cached under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import audit_data as data  # noqa: E402

PARTS = ("tb", "ood", "covid", "phantom")


def ci(d: dict | None, nd: int = 3) -> dict | None:
    if not d or d.get("value") is None:
        return None
    return {k: (round(float(d[k]), nd) if d.get(k) is not None and np.isfinite(d[k]) else None)
            for k in ("value", "lo", "hi")}


def audit(model: Path, stores: list[Path], out: Path, args, **kw) -> dict:
    """run_audit, or its cached audit.json."""
    from medfm.audit.run import AuditConfig, run_audit

    if (out / "audit.json").is_file():
        return json.loads((out / "audit.json").read_text())
    cfg = AuditConfig(n_boot=args.n_boot, n_perm=args.n_perm, **kw)
    t = time.perf_counter()
    doc = run_audit(model, stores, out, cfg)
    print(f"  audit {out.name}: {time.perf_counter() - t:.0f}s", flush=True)
    return doc


def cell(doc: dict, test: str) -> dict:
    return next(c for c in doc["cross_site"]["by_dataset"]["cells"] if c["test_site"] == test)


def same_site_fpr(model: Path, store: Path, n_splits: int, n_perm: int, alpha: float = 0.05) -> dict:
    """Shift tests between random patient-level halves of one hospital: the share flagged is the FPR."""
    from medfm.audit.shift import fpr_bound, ks_test, mmd_test
    from medfm.tasks.adapt.classifier import load_classifier, predict_store

    df, feats = predict_store(load_classifier(model), store, return_features=True)
    pids = df["patient_id"].astype(str)
    pids = pids.where(pids.str.len() > 0, df["case_id"].astype(str)).to_numpy()  # no id: a case each
    uniq = np.unique(pids)
    p = {"mmd": [], "ks": []}
    for s in range(n_splits):
        half = set(np.random.default_rng(s).permutation(uniq)[: len(uniq) // 2])
        a = np.isin(pids, list(half))
        p["mmd"].append(mmd_test(feats[a], feats[~a], alpha, n_perm=n_perm, seed=s).p_value)
        p["ks"].append(ks_test(feats[a], feats[~a], alpha, pca_components=32).p_value)
    return {"n_splits": n_splits, "n_cases": int(len(df)), "alpha": alpha,
            "max_rejections_if_calibrated_95": fpr_bound(n_splits, alpha),
            **{f"{k}_fpr": float(np.mean(np.array(v) < alpha)) for k, v in p.items()},
            **{f"{k}_p_values": [round(float(x), 4) for x in v] for k, v in p.items()}}


def explanation_rows(doc: dict) -> dict:
    out = {}
    for m, r in ((doc.get("explanations") or {}).get("methods") or {}).items():
        loc = r.get("localisation") or {}
        out[m] = {"passed_randomisation": r["passed_randomisation"],
                  "final_spearman": round(r["randomisation"]["final_spearman"], 3),
                  "spearman_by_step": [(s.get("name") or s.get("layer") or str(i), round(s["spearman"], 3))
                                       for i, s in enumerate(r["randomisation"]["steps"])],
                  "mass_in_mask": loc.get("mass_in_mask"), "area_share": loc.get("area_share"),
                  "mass_ratio": loc.get("mass_ratio"), "pointing_game": loc.get("pointing_game"),
                  "pointing_chance": loc.get("pointing_chance"), "n": loc.get("n")}
    return out


def part_tb(args, enc: Path, tb: dict[str, Path], breast: Path | None) -> dict:
    res: dict = {}
    for src, dst in (("shenzhen", "montgomery"), ("montgomery", "shenzhen")):
        model = data.classifier(enc, tb[src], args.work / "models" / f"tb_{src}")
        stores = [tb[src], tb[dst]] + ([breast] if breast is not None and src == "shenzhen" else [])
        doc = audit(model, stores, args.work / "audits" / f"tb_{src}", args, n_explain=args.n_explain)
        ref, tgt = tb[src].name, tb[dst].name
        drop = next(d for d in doc["cross_site"]["by_dataset"]["drops"] if d["test_site"] == tgt)
        shift = doc["shift"][f"{ref} vs {tgt}"]
        probe = (doc.get("shortcuts") or {}).get("dataset", {})
        blanked = ((doc.get("shortcuts") or {}).get("anatomy_blanked") or {}).get(ref)
        ood = {e["score"]: {"auroc": round(e["auroc"], 3), "flagged": round(e["flagged_fraction"], 3),
                            "val_flagged": round(e["val_flagged_fraction"], 3)}
               for e in doc["ood"]["scores"].values() if e.get("auroc") is not None and e["target"] == tgt}
        res[f"{src}_to_{dst}"] = {
            "internal_auroc": ci(cell(doc, ref)["auroc"]), "external_auroc": ci(cell(doc, tgt)["auroc"]),
            "n_internal": cell(doc, ref)["n"], "n_external": cell(doc, tgt)["n"],
            "auroc_drop_external_minus_internal": ci(drop["auroc_drop"]),
            "hospital_probe_auroc": ci(probe.get("auroc")), "hospital_predictable": probe.get("predictable"),
            "mmd_p": shift["mmd"]["p_value"], "ks_p": shift["ks"]["p_value"],
            "domain_classifier_p": shift["domain_classifier"]["p_value"],
            "mmd_cases_to_detect": shift["mmd"].get("sample_size"),
            "lung_blanked": {k: ci(blanked[k]) for k in ("original", "modified", "difference")} | {
                "still_above_chance": blanked["still_above_chance"]} if blanked else None,
            "explanations": explanation_rows(doc), "ood_site_vs_site": ood,
            "findings": doc.get("findings", [])}
        if src == "shenzhen" and breast is not None:
            res["ood_breastmnist_vs_cxr"] = {
                e["score"]: {"auroc": round(e["auroc"], 3), "flagged": round(e["flagged_fraction"], 3)}
                for e in doc["ood"]["scores"].values()
                if e["target"] == breast.name and e.get("auroc") is not None}
        if src == "shenzhen":
            res["same_site_shift_fpr"] = same_site_fpr(model, tb[src], args.splits, args.n_perm)
    return res


def part_covid(args, enc: Path, store: Path) -> dict:
    model = data.classifier(enc, store, args.work / "models" / "covid")
    doc = audit(model, [store], args.work / "audits" / "covid", args, n_explain=0, blank_masks=False)
    out = {"internal_auroc": ci(cell(doc, store.name)["auroc"]), "n_test": cell(doc, store.name)["n"],
           "min_group": 30, "attributes": {}}
    for attr, t in (doc.get("fairness") or {}).items():
        out["attributes"][attr] = {
            "reference": t["reference"], "equalized_odds_difference": t["equalized_odds_difference"],
            "groups": [{"group": g["group"], "n": g["n"], "n_pos": g["n_pos"], "too_small": g["too_small"],
                        "auroc": ci(g["auroc"]), "fnr": ci(g["fnr"]), "fpr": ci(g["fpr"]),
                        "fnr_gap": ci((g.get("gap") or {}).get("fnr"))} for g in t["groups"]]}
    return out


def _site_fnr(doc: dict, group: str) -> tuple[dict, dict]:
    """(FNR of `group`, FNR gap group - the other site) from the audit's fairness table by site."""
    t = doc["fairness"]["site"]
    g = {r["group"]: r for r in t["groups"]}
    if t["reference"] != group:
        return g[group]["fnr"], g[group]["gap"]["fnr"]
    other = next(r for n, r in g.items() if n != group)
    gap = other["gap"]["fnr"]
    return g[group]["fnr"], {"value": -gap["value"], "lo": -gap["hi"], "hi": -gap["lo"]}


def part_phantom(args, enc: Path, base: Path, pop: Path, coh: dict[str, Path],
                 finds: dict[str, Path]) -> dict:
    from medfm.audit.fairness import subgroup_metrics
    from medfm.tasks.adapt.classifier import load_classifier, predict_store

    res: dict = {}
    clean = data.classifier(enc, base, args.work / "models" / "phantom_clean")
    flip = data.classifier(enc, coh["flip"], args.work / "models" / "phantom_flip")
    truth = json.loads((coh["flip"] / "summary.json").read_text())["cohort"]
    for name, model, store in (("clean", clean, base), ("flipped", flip, coh["flip"])):
        doc = audit(model, [store], args.work / "audits" / f"phantom_{name}", args, attributes=["site"],
                    n_explain=0, blank_masks=False)
        fnr_a, gap = _site_fnr(doc, "site_a")
        clf = load_classifier(model)
        df = predict_store(clf, pop)  # the same model on an independent population: the true gap
        tab = subgroup_metrics(df["label"].to_numpy(int), df["prob"].to_numpy(), df["site"].astype(str),
                               threshold=float(clf.threshold))
        true_gap = float(tab.loc["site_a", "fnr"] - tab.loc["site_b", "fnr"])
        res[f"flip_{name}"] = {
            "audit_fnr_site_a": ci(fnr_a), "audit_fnr_gap_a_minus_b": ci(gap),
            "population_fnr_gap": round(true_gap, 3),
            "population_n_pos": {k: int(tab.loc[k, "n_pos"]) for k in tab.index},
            "within_0.05": bool(abs(gap["value"] - true_gap) <= 0.05),
            "ci_excludes_0": bool(gap["lo"] > 0 or gap["hi"] < 0),
            "n_test_pos": {r["group"]: r["n_pos"] for r in doc["fairness"]["site"]["groups"]},
            "threshold": float(clf.threshold)}
    res["flip_truth"] = {k: truth[k] for k in ("group_column", "group_value", "rate", "splits", "per_split")}
    mark = data.classifier(enc, coh["marker"], args.work / "models" / "phantom_marker")
    doc = audit(mark, [coh["marker"]], args.work / "audits" / "phantom_marker", args, attributes=["site"],
                n_explain=0, blank_masks=False)
    clean_doc = json.loads((args.work / "audits" / "phantom_clean" / "audit.json").read_text())
    g = {r["group"]: r for r in doc["fairness"]["site"]["groups"]}
    probe = doc["shortcuts"]["site"]
    res["site_marker"] = {
        "truth": json.loads((coh["marker"] / "summary.json").read_text())["cohort"]["per_split"],
        "probe_auroc_site_from_embeddings": ci(probe["auroc"]), "probe_flagged": probe["predictable"],
        "test_auroc_marker_model": ci(cell(doc, coh["marker"].name)["auroc"]),
        "test_auroc_clean_model": ci(cell(clean_doc, base.name)["auroc"]),
        "fnr_plain": ci(g["site_plain"]["fnr"]), "fnr_marked": ci(g["site_marked"]["fnr"]),
        "fpr_plain": ci(g["site_plain"]["fpr"]), "fpr_marked": ci(g["site_marked"]["fpr"]),
        "findings": [f for f in doc.get("findings", []) if "site" in f]}
    res["site_marker"]["flagged"] = bool(probe["predictable"] and (
        (g["site_plain"]["fnr"]["lo"] or 0) > (g["site_marked"]["fnr"]["hi"] or 1)
        or (g["site_marked"]["fpr"]["lo"] or 0) > (g["site_plain"]["fpr"]["hi"] or 1)))
    res["pointing_game"] = pointing(args, enc, finds)
    if args.supervised_steps > 0:
        res["pointing_game_supervised"] = pointing_supervised(args, finds)
    return res


def _pointing_one(clf, store: Path, f: str, n_point: int, kinds: list[str]) -> dict:
    """Maps on the finding's positive test cases, pointing game against that finding's own mask (the
    store's label map, id from summary.mask_label_names) and the randomisation test."""
    from medfm.audit.cases import as_float
    from medfm.audit.explain_audit import audit_explanations

    names = json.loads((store / "summary.json").read_text())["mask_label_names"]
    fid = int(next(k for k, v in names.items() if v == f))
    imgs, masks, y = data.images_masks(store, "test", f)
    pos = np.flatnonzero((y == 1) & ((masks == fid).reshape(len(masks), -1).any(1)))[:n_point]
    a = audit_explanations(clf, as_float(imgs[pos]), masks=(masks[pos] == fid).astype(np.int64),
                           kinds=kinds, target=1, seed=0, sanity_cases=4,
                           options={"integrated_gradients": {"n_steps": 16}})
    return {m: {"pointing_game": round(r.localisation.pointing_game, 3),
                "pointing_chance": round(r.localisation.pointing_chance, 3),
                "mass_ratio": round(r.localisation.mass_ratio, 3), "n": r.localisation.n,
                "randomisation_final_spearman": round(r.randomisation.final_spearman, 3)}
            for m, r in a.methods.items()}


def pointing(args, enc: Path, finds: dict[str, Path]) -> dict:
    """Per finding: a linear probe on the MAE encoder (the audited models of this benchmark)."""
    from medfm.audit.model_checks import resolve_methods
    from medfm.tasks.adapt.classifier import load_classifier

    cache = args.work / f"pointing_n{args.n_point}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    out = {}
    for f, store in finds.items():
        clf = load_classifier(data.classifier(enc, store, args.work / "models" / f"phantom_{f}"))
        out[f] = _pointing_one(clf, store, f, args.n_point, resolve_methods(clf, None))
    cache.write_text(json.dumps(out, indent=1))
    return out


def pointing_supervised(args, finds: dict[str, Path]) -> dict:
    """Per finding: a ResNet-18 (width 16, small-input stem, max pool) trained from scratch on that finding
    (`--supervised-steps` steps) — a model that has learnt the finding, to show what localisation looks like
    when there is something to localise. Grad-CAM and integrated gradients."""
    import torch

    from medfm.models.registry import create_encoder
    from medfm.tasks.adapt import AdaptConfig
    from medfm.tasks.adapt.classifier import load_classifier
    from medfm.tasks.adapt.single import fit_classifier

    steps = args.supervised_steps
    cache = args.work / f"pointing_supervised_n{args.n_point}_s{steps}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    out = {}
    for f, store in finds.items():
        run = args.work / "models" / f"phantom_{f}_scratch_s{steps}"
        if not (run / "config.json").is_file():
            torch.manual_seed(0)
            enc = create_encoder("resnet18", img_size=args.size, in_chans=1, width=16, small_input=True,
                                 global_pool="max")
            fit_classifier(enc, store, run, method="scratch",
                           cfg=AdaptConfig(methods=["scratch"], steps=steps, batch_size=32))
        metrics = json.loads((run / "metrics.json").read_text())
        clf = load_classifier(run)
        out[f] = {"test_auroc": round(float(metrics["auroc"]), 3),
                  **_pointing_one(clf, store, f, args.n_point, ["gradcam", "integrated_gradients"])}
    cache.write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("benchmarks/work/audit"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300, help="MAE pretraining steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--n-perm", type=int, default=200)
    ap.add_argument("--n-explain", type=int, default=16)
    ap.add_argument("--n-point", type=int, default=24, help="positive test cases per finding (pointing game)")
    ap.add_argument("--supervised-steps", type=int, default=300,
                    help="steps of the from-scratch ResNet-18 per finding for the supervised pointing game "
                         "(0: skip)")
    ap.add_argument("--splits", type=int, default=20, help="same-site random halves (shift FPR)")
    ap.add_argument("--phantom-n", type=int, default=2400)
    ap.add_argument("--population-n", type=int, default=4000)
    ap.add_argument("--flip-rate", type=float, default=0.5)
    ap.add_argument("--marker-corr", type=float, default=0.95)
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MEDFM_PROGRESS", "0")
    t0 = time.perf_counter()
    w, s = args.work, args.size

    def step(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    step("data")
    tb = data.tb_stores(w, s)
    covid = data.covid_store(w, s)
    base = data.phantom_store(w, "phantom", args.phantom_n, 0, s)
    step("encoder")
    enc = data.encoder(w, s, args.steps, [tb["shenzhen"], tb["montgomery"], covid, base])
    res: dict = {}
    if "tb" in parts or "ood" in parts:
        step("tb + ood")
        res["tb"] = part_tb(args, enc, tb, data.breast_store(w, s) if "ood" in parts else None)
    if "covid" in parts:
        step("covid")
        res["covid"] = part_covid(args, enc, covid)
    if "phantom" in parts:
        step("phantom")
        pop = data.phantom_store(w, "population", args.population_n, 1, s)
        coh = data.cohorts(w, base, args.flip_rate, args.marker_corr)
        res["phantom"] = part_phantom(args, enc, base, pop, coh, data.finding_stores(w, base))
    wall = time.perf_counter() - t0
    import audit_md

    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "encoder": f"MAE vit_tiny {data.ENCODER_ARGS} patch 8, {s} px, {args.steps} steps on the train "
                       "splits of TB + COVID + phantom (labels unused); audited models: linear probes",
            "wall_s": round(wall, 1), "threads": args.threads, "n_boot": args.n_boot, "n_perm": args.n_perm,
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared: timings noisy)", "parts": parts}
    js, md = audit_md.write(args.out, "audit_bench", res, meta)
    print(md.read_text())
    step(f"wrote {js}")


if __name__ == "__main__":
    main()
