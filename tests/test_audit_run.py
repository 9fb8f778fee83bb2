"""The audit orchestrator: a tiny classifier audited on two stores (two sites + a third hospital, label
visible as a bright square, lung-like masks): every section present with sane numbers, audit.html with
every section id, monitor mode without labels, one-line errors, nothing identifying written."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import medfm
from medfm.audit.run import SECTION_IDS, AuditConfig, run_audit
from medfm.errors import InputError, MedfmError
from test_adapt import make_prepared  # tests/ is on sys.path (pytest rootdir import mode)

SECRET = "PATIENT_SECRET"
ARCHIVE = "/archive/HOSPITAL_SECRET_FOLDER"
FAST = dict(n_boot=30, n_perm=30, min_group=10, n_explain=4)


def make_store(root: Path, seed: int, sites: tuple[str, ...], labels: bool = True, masks: bool = True,
               n: int = 60) -> Path:
    """make_prepared + sex/age, identifying ids and source paths, masks around the label square."""
    d = make_prepared(root, n=n, seed=seed, sites=sites)
    m = pd.read_parquet(d / "manifest.parquet")
    m["sex"] = np.where(np.arange(n) % 3 == 0, "F", "M")
    m["age"] = 20 + (np.arange(n) * 7) % 60
    m["patient_id"] = [f"{SECRET}_{p}" for p in m["patient_id"]]
    m["source"] = [f"{ARCHIVE}/img_{i}.dcm" for i in range(n)]
    summary = json.loads((d / "summary.json").read_text())
    summary.update(source=ARCHIVE, case_map=f"{ARCHIVE}/case_map.csv")
    if masks:
        mk = np.zeros((n, 16, 16), np.uint8)
        mk[:, 0:12, 2:9] = 1
        (d / "masks").mkdir(exist_ok=True)
        np.save(d / "masks" / "shard-00000.npy", mk)
        m["has_mask"] = True
        summary["has_masks"] = True
    if not labels:
        m = m.drop(columns=["label"])
        summary.update(label_columns=[], task=None)
    m.to_parquet(d / "manifest.parquet", index=False)
    (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from medfm.models.registry import create_encoder
    from medfm.tasks.adapt import fit_classifier

    root = tmp_path_factory.mktemp("audit")
    ref = make_store(root / "ref", 0, ("a", "b"))
    tgt = make_store(root / "tgt", 1, ("c",))
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", img_size=16, patch_size=4, depth=1, embed_dim=16, num_heads=2)
    fit_classifier(enc, ref, root / "model", method="linear")
    return {"root": root, "ref": ref, "tgt": tgt, "model": root / "model"}


@pytest.fixture(scope="module")
def full(world):
    out = world["root"] / "out"
    cfg = AuditConfig(per_site=True, tent=True, **FAST)
    return run_audit(world["model"], [world["ref"], world["tgt"]], out, cfg), out


def _walk_ci(obj, found: list) -> None:
    if isinstance(obj, dict):
        if {"value", "lo", "hi"} <= set(obj) and None not in (obj["lo"], obj["hi"], obj["value"]):
            found.append(obj)
        for v in obj.values():
            _walk_ci(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _walk_ci(v, found)


def _p_values(obj, found: list) -> None:
    if isinstance(obj, dict):
        found += [v for k, v in obj.items() if k.endswith("p_value") and v is not None]
        for v in obj.values():
            _p_values(v, found)
    elif isinstance(obj, list):
        for v in obj:
            _p_values(v, found)


def test_full_audit_has_every_section_with_sane_values(full):
    doc, out = full
    assert set(doc["sections"]) == {"cross_site", "shift", "ood", "fairness", "calibration", "explanations",
                                    "shortcuts", "mitigation"}
    assert doc == json.loads((out / "audit.json").read_text())
    assert doc["datasets"]["ref"]["role"] == "reference"
    assert doc["datasets"]["tgt"]["cases_used"] == "all cases"
    cs = doc["cross_site"]
    cells = {c["test_site"]: c for c in cs["by_dataset"]["cells"]}
    assert cells["ref"]["internal"] and not cells["tgt"]["internal"] and cells["tgt"]["n"] == 60
    assert cs["by_dataset"]["drops"][0]["test_site"] == "tgt"
    per_site = cs["per_site_models"]
    assert set(per_site["sites"]["train"]) == {"ref/a", "ref/b", "tgt/c"}
    assert len(per_site["cells"]) == 9 and sum(c["internal"] for c in per_site["cells"]) == 3
    matrices = ("by_dataset", "by_site", "per_site_models")
    aurocs = [c["auroc"]["value"] for k in matrices for c in cs[k]["cells"]]
    assert all(0 <= a <= 1 for a in aurocs) and cells["ref"]["auroc"]["value"] > 0.8  # the label is visible
    cis: list = []
    _walk_ci(doc, cis)
    assert len(cis) > 50 and all(c["lo"] <= c["hi"] + 1e-9 for c in cis)
    ps: list = []
    _p_values(doc["shift"], ps)
    assert ps and all(0 <= p <= 1 for p in ps)
    assert "ref vs tgt" in doc["shift"] and "ref: site a vs other sites" in doc["shift"]
    ood = doc["ood"]
    assert {e["score"] for e in ood["scores"].values()} == {"mahalanobis", "knn", "energy"}
    assert all(0 <= e["auroc"] <= 1 and 0 <= e["flagged_fraction"] <= 1 for e in ood["scores"].values())
    top = ood["scores"]["tgt / mahalanobis"]["most_atypical"]
    assert top and all(r["case_id"].startswith("c") for r in top)
    assert set(doc["fairness"]) == {"sex", "age_band", "site", "dataset"}
    assert all(0 <= g["fnr"]["value"] <= 1 for g in doc["fairness"]["sex"]["groups"])
    cal = doc["calibration"]
    assert cal["temperature"] > 0 and cal["after"]["nll"] <= cal["before"]["nll"] + 1e-9
    assert set(cal["by_group"]) == {"sex", "age_band", "site", "dataset"}
    ex = doc["explanations"]
    assert set(ex["methods"]) == {"rollout", "integrated_gradients"} and ex["n_cases"] == 4
    assert all(m["localisation"] is not None for m in ex["methods"].values())  # the stores have masks
    sc = doc["shortcuts"]
    assert {"sex", "age", "site", "dataset"} <= set(sc) and "anatomy_blanked" in sc
    blank = sc["anatomy_blanked"]["ref"]
    assert blank["original"]["value"] > blank["modified"]["value"]  # the square sits inside the mask
    assert set(doc["mitigation"]["tgt"]) == {"bn", "tent"}
    assert doc["mitigation"]["tgt"]["bn"]["applicable"] is False  # a ViT has no BatchNorm: said, not faked
    assert medfm.load_run(out) == doc


def test_report_files_and_html_sections(full):
    doc, out = full
    page = (out / "audit.html").read_text()
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in page
    assert page.index('id="summary"') < page.index('id="cross-site"') < page.index('id="mitigation"')
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") >= 8
    for f in doc["findings"]:
        assert html.escape(f) in page
    figs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"cross_site_matrix.png", "reliability.png", "explanations.png", "randomisation.png",
            "ood_hist_0.png", "fairness_0.png"} <= figs
    conf = json.loads((out / "config.json").read_text())
    assert conf["kind"] == "audit" and conf["settings"]["per_site"] is True
    assert "trust audit" in (out / "README.md").read_text()


def test_nothing_identifying_is_written(full):
    _, out = full
    for p in out.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".html", ".md"):
            text = p.read_text()
            assert SECRET not in text and "HOSPITAL_SECRET_FOLDER" not in text, p.name


def test_monitor_mode_on_an_unlabelled_target(world, tmp_path):
    batch = make_store(tmp_path / "batch", 2, ("d",), labels=False, masks=False, n=40)
    cfg = AuditConfig(attributes=["site"], n_boot=20, n_perm=20, n_explain=0, min_group=5)
    doc = run_audit(world["model"], [world["ref"], batch], tmp_path / "out", cfg)
    assert doc["datasets"]["batch"]["mode"].startswith("monitor")
    assert any(f.startswith("monitor batch") for f in doc["findings"])
    assert "ref vs batch" in doc["shift"] and "batch / knn" in doc["ood"]["scores"]
    assert {c["test_site"] for c in doc["cross_site"]["by_dataset"]["cells"]} == {"ref"}  # no labels, no rows
    assert "explanations" not in doc["sections"] and "n_explain" in doc["notes"]["explanations"]
    page = (tmp_path / "out" / "audit.html").read_text()
    assert all(f'<section id="{sid}">' in page for sid in SECTION_IDS)
    assert "Nothing to show" in page


def test_bad_inputs_are_one_line_errors(world, tmp_path):
    cfg = AuditConfig(**FAST)
    no_test = make_prepared(tmp_path / "no_test", n=20, splits=("train", "val"))
    three = make_prepared(tmp_path / "three", n=30, task="multiclass")
    cases = [
        (lambda: run_audit(world["model"], [tmp_path / "missing"], tmp_path / "o", cfg), "missing"),
        (lambda: run_audit(world["model"], [no_test], tmp_path / "o", cfg), "no test split"),
        (lambda: run_audit(world["model"], [world["ref"], three], tmp_path / "o", cfg), "binary"),
        (lambda: run_audit(world["ref"], [world["ref"]], tmp_path / "o", cfg), "run directory"),
        (lambda: run_audit(world["model"], [world["ref"], world["ref"]], tmp_path / "o", cfg), "twice"),
        (lambda: run_audit(world["model"], [world["ref"]], tmp_path / "o", AuditConfig(alpha=2)), "alpha"),
    ]
    for call, needle in cases:
        with pytest.raises(MedfmError) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value)
    adapt_run = tmp_path / "adapt_run"
    medfm.rundir.RunDir(adapt_run, "adapt").write_config({})
    with pytest.raises(InputError, match="cannot be audited; the audit takes a 'classifier'"):
        run_audit(adapt_run, [world["ref"]], tmp_path / "o", cfg)


def test_multilabel_classifier_is_audited_one_label_at_a_time(tmp_path):
    """A multi-label model (the phantom's findings, the demo's model) is audited per label with --label."""
    from medfm.models.registry import create_encoder
    from medfm.tasks.adapt import fit_classifier

    data = make_prepared(tmp_path / "ml", n=60, task="multilabel", sites=("a", "b"))
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", img_size=16, patch_size=4, depth=1, embed_dim=16, num_heads=2)
    clf = fit_classifier(enc, data, tmp_path / "model", method="linear")
    assert clf.task == "multilabel"
    with pytest.raises(InputError, match="one label at a time: give --label"):
        run_audit(tmp_path / "model", [data], tmp_path / "o0", AuditConfig(**FAST))
    doc = run_audit(tmp_path / "model", [data], tmp_path / "o1",
                    AuditConfig(label="finding1", attributes=["site"], **FAST))
    (cell,) = doc["cross_site"]["by_dataset"]["cells"]
    y = pd.read_parquet(data / "manifest.parquet").query("split == 'test'")["finding1"]
    assert cell["internal"] and cell["n"] == len(y) and cell["n_pos"] == int((y == 1).sum())
    assert 0 <= cell["auroc"]["value"] <= 1
