"""Phantom data generator: determinism, label/mask/report consistency, splits, sites, files and CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfm.data.phantom import (
    FINDINGS,
    extract_labels,
    generate_ct_case,
    generate_cxr_case,
    make_case,
    make_sites,
    montage,
    write_phantom,
)
from medfm.data.phantom.cohort import plan_case
from medfm.data.phantom.reports import MENTIONS, NEGATION, make_report, split_sentences
from medfm.errors import ConfigError

SITES = make_sites(3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_byte_identical_and_seed_matters(tmp_path: Path) -> None:
    a = _files(write_phantom("cxr", 5, tmp_path / "a", seed=3, size=64))
    b = _files(write_phantom("cxr", 5, tmp_path / "b", seed=3, size=64, workers=2))
    c = _files(write_phantom("cxr", 5, tmp_path / "c", seed=4, size=64))
    assert a == b
    assert len([k for k in a if k.startswith("images/")]) == 5
    assert a["images/cxr_0000000.png"] != c["images/cxr_0000000.png"]
    # The in-memory API is a pure function of (index, seed).
    x1, m1, r1 = generate_cxr_case(2, seed=3, size=64)
    x2, m2, r2 = generate_cxr_case(2, seed=3, size=64)
    assert np.array_equal(x1, x2) and np.array_equal(m1, m2) and r1 == r2
    assert x1.dtype == np.uint8 and x1.shape == (64, 64) and m1.shape == (64, 64)


def test_resume_rewrites_only_missing_cases(tmp_path: Path) -> None:
    root = write_phantom("cxr", 4, tmp_path / "d", seed=1, size=48)
    before = _files(root)
    victim = root / "images" / "cxr_0000002.png"
    victim.unlink()
    keep = root / "images" / "cxr_0000001.png"
    t_keep = keep.stat().st_mtime_ns
    write_phantom("cxr", 4, root, seed=1, size=48)
    assert _files(root) == before
    assert keep.stat().st_mtime_ns == t_keep


@pytest.mark.parametrize("kind,size,count", [("cxr", 64, 36), ("ct3d", 24, 8)])
def test_finding_masks_match_labels(kind: str, size: int, count: int) -> None:
    seen = dict.fromkeys(FINDINGS, 0)
    for i in range(count):
        c = make_case(kind, i, seed=0, size=size)
        for j, name in enumerate(FINDINGS, start=1):
            has_pixels = bool((c.findings == j).any())
            assert has_pixels == bool(c.record[name]), (kind, i, name)
            seen[name] += c.record[name]
        assert set(np.unique(c.organs)) >= {0, 1, 2, 3}  # both lungs and the heart are always there
    assert all(v > 0 for v in seen.values()) or kind == "ct3d", seen


def test_ctr_measured_from_masks_matches_record() -> None:
    for i in range(12):
        c = make_case("cxr", i, seed=5, size=128)
        cols_heart = np.nonzero((c.organs == 3).any(0))[0]
        cols_lung = np.nonzero(np.isin(c.organs, [1, 2]).any(0))[0]
        ctr = (np.ptp(cols_heart) + 1) / (np.ptp(cols_lung) + 1)
        assert abs(ctr - c.record["ctr"]) < 0.05, (i, ctr, c.record["ctr"])
        assert (c.record["ctr"] > 0.5) == bool(c.record["cardiomegaly"])


def test_reports_consistent_with_labels() -> None:
    negated_seen = 0
    for kind in ("cxr", "ct"):
        for i in range(250):
            rec = plan_case("cxr", i, 0, SITES)
            text = make_report(rec, np.random.default_rng(i), kind)
            assert text.startswith("FINDINGS: ") and "\nIMPRESSION: " in text
            assert extract_labels(text) == {f: rec[f] for f in FINDINGS}, text
            for sent in split_sentences(text.lower()):
                for name, pat in MENTIONS.items():
                    if re.search(pat, sent) and not rec[name]:
                        assert re.search(NEGATION, sent), (name, sent)
                        negated_seen += 1
            if rec["nodule"]:
                assert f"{rec['nodule_size_mm']:.0f} mm" in text and rec["nodule_side"] in text.lower()
    assert negated_seen > 50  # explicit negations do occur


def test_patient_level_splits_and_repeat_studies() -> None:
    recs = [plan_case("cxr", i, 0, SITES) for i in range(400)]
    df = pd.DataFrame(recs)
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    studies = df.groupby("patient_id").size()
    assert studies.max() >= 2 and (studies >= 2).sum() > 20
    assert df["study_id"].is_unique
    assert ((df["age"] >= 20) & (df["age"] <= 90)).all() and set(df["sex"]) == {"M", "F"}
    # Nodules persist in follow-up studies and never shrink.
    for _, g in df.groupby("patient_id"):
        sizes = g.loc[g["nodule"] == 1, "nodule_size_mm"].tolist()
        if sizes:
            assert g["nodule"].iloc[-1] == 1 and sizes == sorted(sizes)
    # Prevalence in a usable range for classifiers, older patients have more nodules/cardiomegaly.
    for f in FINDINGS:
        assert 0.12 < df[f].mean() < 0.45, (f, df[f].mean())
    old = df["age"] >= 60
    assert df.loc[old, "cardiomegaly"].mean() > df.loc[~old, "cardiomegaly"].mean()


def test_sites_differ_measurably() -> None:
    def highpass_std(img: np.ndarray) -> float:
        # Robust (median absolute deviation) so anatomy edges and text markers don't count as noise.
        x = img.astype(np.float32) / (4095.0 if img.dtype == np.uint16 else 255.0)
        d = x[1:, :] - x[:-1, :]
        return float(1.4826 * np.median(np.abs(d - np.median(d))))

    noise = {}
    for i in range(9):
        c = make_case("cxr", i, seed=0, size=96)
        noise.setdefault(c.record["site"], []).append(highpass_std(c.image))
        if c.record["site"] == "site_b":
            assert c.image.dtype == np.uint16 and c.image.max() > 255  # 12-bit site
    assert np.mean(noise["site_b"]) > 1.5 * np.mean(noise["site_a"]), noise
    sp = {}
    for i in range(6):
        c = make_case("ct3d", i, seed=0, size=20)
        sp[c.record["site"]] = c.spacing
    assert len(set(sp.values())) == len(sp) >= 2


def test_ct_nifti_layout_and_spacing(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    root = write_phantom("ct3d", 2, tmp_path / "ct", seed=0, size=24, mask_set="all")
    man = pd.read_csv(root / "manifest.csv", keep_default_na=False)
    info = json.loads((root / "dataset.json").read_text())
    assert info["modality"] == "ct" and info["mask_set"] == "all" and "aorta" in info["mask_labels"].values()
    for _, row in man.iterrows():
        img = nib.load(root / row["image"])
        msk = nib.load(root / row["mask"])
        sz, sy, sx = (float(v) for v in row["spacing_mm"].split("x"))
        assert np.allclose(img.header.get_zooms()[:3], (sx, sy, sz))
        assert np.allclose(np.diag(img.affine)[:3], (sx, sy, sz))
        assert img.get_data_dtype() == np.int16 and img.shape == msk.shape == (24, 24, 24)
        v = np.asarray(img.dataobj).transpose(2, 1, 0)
        c = make_case("ct3d", int(row["case_id"].split("_")[1]), seed=0, size=24)
        assert np.array_equal(v, c.image)
        assert np.median(v[c.organs == 1]) < -600  # air-filled lung in HU
    vol, mask, rec = generate_ct_case(0, seed=0, size=24)
    assert vol.shape == mask.shape == (24, 24, 24) and vol.dtype == np.int16 and "report" in rec


def test_cli_writes_layout(tmp_path: Path) -> None:
    from medfm.cli.app import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["data", "phantom", "--kind", "cxr", "--n", "3", "--out", str(out),
                                   "--size", "48", "--mask-set", "findings",
                                   "--montage", str(tmp_path / "m.png")])
    assert res.exit_code == 0, res.output
    man = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    for col in ["case_id", "image", "mask", "report", "patient_id", "study_id", "site", "sex", "age", "split",
                *FINDINGS, "nodule_size_mm", "nodule_side", "nodule_zone", "ctr"]:
        assert col in man.columns, col
    assert len(man) == 3
    for col in ("image", "mask", "mask_organs", "mask_findings"):
        assert all((out / p).is_file() for p in man[col])
    assert all(m.endswith("_findings.png") for m in man["mask"])
    info = json.loads((out / "dataset.json").read_text())
    assert info["kind"] == "cxr" and info["modality"] == "xray" and info["task"] == "multilabel"
    assert info["label_columns"] == list(FINDINGS) and info["mask_labels"]["1"] == "nodule"
    assert set(info["sites"]) == {"site_a", "site_b", "site_c"} and info["seed"] == 0 and info["n"] == 3
    assert (tmp_path / "m.png").stat().st_size > 1000

    bad = CliRunner().invoke(app, ["data", "phantom", "--kind", "xray", "--n", "2", "--out", str(out)])
    assert bad.exit_code != 0 and isinstance(bad.exception, ConfigError) and "--kind" in str(bad.exception)
    with pytest.raises(ConfigError, match="--seed"):
        write_phantom("cxr", 1, tmp_path / "x", seed=-1)


def test_montage_requires_manifest(tmp_path: Path) -> None:
    from medfm.errors import InputError

    with pytest.raises(InputError, match="manifest.csv"):
        montage(tmp_path, tmp_path / "m.png")
