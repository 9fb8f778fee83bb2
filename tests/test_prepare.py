"""`medfm data prepare`: real data subsets, resume, bad inputs, de-identification, dataset round-trip, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medfm.cli.app import app
from medfm.data.prepare import PrepareConfig, prepare
from medfm.data.splits import leaking_groups
from medfm.data.store import PreparedDataset, read_manifest, read_summary
from medfm.errors import ConfigError, InputError


def _cfg(tmp_path, **kw):
    kw.setdefault("size", 64)
    kw.setdefault("shard_size", 8)
    return PrepareConfig(salt_file=str(tmp_path / "salt"), **kw)


def _cfg_out(data_dir, tmp_path, **kw):
    """_subset manifests live in tmp_path but point into data_dir: allowed explicitly (issue 16 item 4)."""
    return _cfg(tmp_path, allow_outside=[str(data_dir)], **kw)


def _subset(data_dir, tmp_path, name, n_per, by, extra=None):
    """A subset manifest with absolute paths (the real folder is never copied)."""
    d = data_dir / name
    df = pd.read_csv(d / "manifest.csv", dtype=str, keep_default_na=False)
    sub = pd.concat([g.head(n_per) for _, g in df.groupby(by, sort=True)]) if by else df.head(n_per)
    if extra is not None:
        sub = pd.concat([sub, df[extra(df)]]).drop_duplicates("image")
    for col in ("image", "mask"):
        if col in sub:
            sub[col] = [str(d / v) if v else "" for v in sub[col]]
    p = tmp_path / f"{name}.csv"
    sub.to_csv(p, index=False)
    return p, sub.reset_index(drop=True)


def test_cxr_lung_seg_subset(data_dir, tmp_path):
    src, sub = _subset(data_dir, tmp_path, "cxr_lung_seg", 10, "site")
    # keep_identifiers: this test joins the prepared rows back to the source by case id.
    s = prepare(src, tmp_path / "out", _cfg_out(data_dir, tmp_path, keep_identifiers=True), progress=False)
    assert s["n_cases"] == 20 and s["n_skipped"] == 0 and s["image_shape"] == [1, 64, 64]
    assert s["counts"]["site"] == {"montgomery": 10, "shenzhen": 10} and s["task"] == "binary"
    ds = PreparedDataset(tmp_path / "out")
    man = ds.manifest.set_index("case_id")
    by_name = sub.assign(case_id=[Path(p).stem for p in sub["image"]]).set_index("case_id")
    assert (man["split"] == by_name.loc[man.index, "split"]).all()  # fixed split kept
    for i in (0, 13):
        item = ds[i]
        row = by_name.loc[item["case_id"]]
        assert int(item["label"]) == int(row["tuberculosis"])
        # Independent reference: the original PNG resized with PIL (square image: pad == plain resize).
        ref = np.asarray(Image.open(row["image"]).convert("L").resize((64, 64), Image.Resampling.BILINEAR))
        img = item["image"][0].numpy() * 255
        src_arr = np.asarray(Image.open(row["image"]).convert("L"), dtype=np.float32)
        ref_scaled = (ref - src_arr.min()) / (src_arr.max() - src_arr.min()) * 255  # min-max normalised
        assert np.abs(img - ref_scaled).mean() < 3.0
        mask = item["mask"].numpy()
        assert set(np.unique(mask)) == {0, 1} and 0.1 < mask.mean() < 0.6  # lungs: a fair part of a CXR
        ref_mask = np.asarray(Image.open(row["mask"]).resize((64, 64), Image.Resampling.NEAREST)) > 127
        assert (mask.astype(bool) == ref_mask).mean() > 0.97


def test_covid_notes_subset_deidentified_patient_splits(data_dir, tmp_path):
    src, sub = _subset(
        data_dir,
        tmp_path,
        "covid_cxr_notes",
        16,
        None,
        extra=lambda df: df["patient_id"].isin(df["patient_id"].head(16)),
    )
    s = prepare(src, tmp_path / "out", _cfg_out(data_dir, tmp_path, resize_mode="pad"), progress=False)
    man = read_manifest(tmp_path / "out")
    assert s["n_cases"] == len(sub) and (man["report"].str.len() > 20).all()
    assert man["patient_id"].str.startswith("p_").all()
    assert not set(man["patient_id"]) & set(sub["patient_id"])
    assert man["patient_id"].nunique() == sub["patient_id"].nunique()  # linkage survives hashing
    assert leaking_groups(man) == []
    assert set(man["sex"]) <= {"M", "F", ""} and man["age"].notna().any()
    # Same salt -> same hashes on a second run; the salt file lives outside the output.
    s2 = prepare(src, tmp_path / "out2", _cfg_out(data_dir, tmp_path), progress=False)
    assert list(read_manifest(tmp_path / "out2")["patient_id"]) == list(man["patient_id"]) and s2["n_cases"]
    assert not any(p.name == "salt" for p in (tmp_path / "out").rglob("*"))
    # A non-square image is letterboxed: its padding rows/cols are exactly 0.
    shapes = [json.loads(x) for x in man["orig_shape"]]
    i = next(k for k, sh in enumerate(shapes) if abs(sh[1] - sh[2]) > 0.2 * max(sh[1:]))
    img = PreparedDataset(tmp_path / "out")[i]["image"][0].numpy()
    edge = img[0, :] if shapes[i][1] < shapes[i][2] else img[:, 0]
    assert edge.max() == 0


def _pngs(d: Path, n: int, size=(20, 24)) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(d / f"img{i:03d}.png")
    return d


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    src = _pngs(tmp_path / "src", 14)
    cfg = _cfg(tmp_path, size=16, shard_size=4)
    full = prepare(src, tmp_path / "full", cfg, progress=False)
    with pytest.raises(RuntimeError, match="test hook"):
        prepare(src, tmp_path / "res", cfg, progress=False, fail_after_shards=2)
    progress = json.loads((tmp_path / "res" / "progress.json").read_text())
    assert sorted(progress["done"]) == ["0", "1"] and not (tmp_path / "res" / "summary.json").exists()
    calls = []
    import medfm.data.prepare_worker as worker

    orig = worker.process_case
    worker.process_case = lambda job: calls.append(job) or orig(job)
    try:
        resumed = prepare(src, tmp_path / "res", cfg, progress=False)
    finally:
        worker.process_case = orig
    assert len(calls) == 14 - 8  # only the two unfinished shards were processed again
    for key in ("n_cases", "counts", "fingerprint", "image_shape", "skipped"):
        assert resumed[key] == full[key]
    for f in sorted((tmp_path / "full" / "images").iterdir()):
        assert f.read_bytes() == (tmp_path / "res" / "images" / f.name).read_bytes()
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "full"), read_manifest(tmp_path / "res"))
    assert not (tmp_path / "res" / "progress.json").exists()
    # Rerunning a finished command is a no-op; different settings into the same folder are refused.
    assert prepare(src, tmp_path / "res", cfg, progress=False)["fingerprint"] == full["fingerprint"]
    with pytest.raises(ConfigError, match="different settings"):
        prepare(src, tmp_path / "res", _cfg(tmp_path, size=32, shard_size=4), progress=False)


def test_parallel_workers_give_identical_shards(tmp_path):
    src = _pngs(tmp_path / "src", 10)
    prepare(src, tmp_path / "a", _cfg(tmp_path, size=16, shard_size=4), progress=False)
    prepare(src, tmp_path / "b", _cfg(tmp_path, size=16, shard_size=4, workers=2), progress=False)
    for f in sorted((tmp_path / "a" / "images").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / "images" / f.name).read_bytes()


def test_in_process_prepare_keeps_the_callers_thread_count(tmp_path, monkeypatch):
    # regression: preparing in-process used to pin torch to 1 thread for everything after it (make demo)
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prepare(_pngs(tmp_path / "src", 4), tmp_path / "a", _cfg(tmp_path, size=16), progress=False)
        assert torch.get_num_threads() == 2
        assert "OMP_NUM_THREADS" not in os.environ
    finally:
        torch.set_num_threads(before)


def test_bad_inputs_are_skipped_and_reported(tmp_path):
    from badinputs import make_bad_corpus

    files = make_bad_corpus(tmp_path / "bad")
    # keep_identifiers: errors and sources name the real files (test_no_identifiers covers the default).
    s = prepare(
        tmp_path / "bad", tmp_path / "out", _cfg(tmp_path, size=16, keep_identifiers=True), progress=False
    )
    skipped = {r["case_id"]: r["error"] for r in s["skipped"]}
    must_fail = [
        "zero_byte_png",
        "truncated_png",
        "truncated_dicom",
        "dicom_no_pixels",
        "text_as_png",
        "nan_nifti",
        "inf_nifti",
        "truncated_nifti",
        "bomb_png",
        "bomb_nifti",
        "dicom_undecodable",
    ]
    errors = list(skipped.values())
    for name in must_fail:
        hits = [e for e in errors if e.startswith(str(files[name]) + ":")]
        assert len(hits) == 1 and "\n" not in hits[0], (name, errors)
    kept = set(read_manifest(tmp_path / "out")["source"])
    for name in ("good_image", "jpeg_as_dcm", "png_as_jpg", "mismatch_image", "good_mask"):
        assert str(files[name]) in kept, name
    assert s["n_cases"] == len(kept) and s["n_skipped"] == len(skipped) == len(errors)


def test_bad_manifests(tmp_path):
    from badinputs import make_bad_corpus

    files = make_bad_corpus(tmp_path / "bad")
    s = prepare(
        files["manifest_missing_file"],
        tmp_path / "o1",
        _cfg(tmp_path, size=16, keep_identifiers=True),
        progress=False,
    )
    assert s["n_cases"] == 3 and [r["case_id"] for r in s["skipped"]] == ["c9"]
    assert "does_not_exist.png: file not found" in s["skipped"][0]["error"]
    res = CliRunner().invoke(
        app,
        [
            "data",
            "prepare",
            str(files["manifest_duplicate_ids"]),
            "--out",
            str(tmp_path / "o2"),
            "--salt-file",
            str(tmp_path / "salt"),
        ],
    )
    # Issue 16 item 6: the duplicate row is skipped and listed, the job goes on with the first one.
    assert res.exit_code == 0, res.output
    s2 = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert s2["n_cases"] == 3 and len(s2["skipped"]) == 1
    assert "row 5: duplicate case id (first at row 3; row skipped)" in s2["skipped"][0]["error"]
    # An image/mask pair with different shapes is one skipped case, not a crash.
    pd.DataFrame(
        {
            "image": [str(files["mismatch_image"]), str(files["good_image"])],
            "mask": [str(files["mismatch_mask"]), str(files["good_mask"])],
        }
    ).to_csv(tmp_path / "m.csv")
    s = prepare(tmp_path / "m.csv", tmp_path / "o3", _cfg(tmp_path, size=16), progress=False)
    assert s["n_cases"] == 1 and "does not match image shape" in s["skipped"][0]["error"]


def test_dicom_series_deidentified(tmp_path):
    from badinputs import FAKE_IDENTIFIERS, make_dicom
    from medfm.data.deid import SALT_FILE

    rng = np.random.default_rng(0)
    for series in ("s1", "s2"):
        d = tmp_path / "src" / "study" / series
        d.mkdir(parents=True)
        uid = f"1.2.826.0.1.3680043.8.498.{1 if series == 's1' else 2}"
        for z in range(5):
            make_dicom(
                d / f"{z}.dcm",
                (rng.random((20, 24)) * 2000).astype(np.int16) - 1000,
                signed=True,
                modality="CT",
                spacing=(0.8, 0.8),
                position=(0.0, 0.0, 2.5 * z),
                series_uid=uid,
                instance=z + 1,
                slope=1.0,
                intercept=0.0,
            )
    s = prepare(
        tmp_path / "src",
        tmp_path / "out",
        _cfg(tmp_path, spacing=(2.0, 1.0, 1.0), volume_shape=(6, 16, 16)),
        progress=False,
    )
    assert s["n_cases"] == 2 and s["spatial_dims"] == 3 and s["image_shape"] == [1, 6, 16, 16]
    assert s["image_dtype"] == "float16" and s["modality"] == ["ct"]
    man = read_manifest(tmp_path / "out")
    assert man["patient_id"].nunique() == 1 and man["patient_id"][0].startswith("p_")  # same patient, hashed
    assert leaking_groups(man) == []
    assert json.loads(man["orig_spacing"][0]) == [2.5, 0.8, 0.8] and set(man["sex"]) == {"F"}
    vol = PreparedDataset(tmp_path / "out")[0]["image"]
    assert vol.shape == (1, 6, 16, 16) and 0 <= float(vol.min()) and float(vol.max()) <= 1
    # No identifier from the headers in any output file (names, IDs, institution, dates, UIDs).
    needles = [v for v in FAKE_IDENTIFIERS.values()] + ["Doe", "Jane", "1.2.826.0.1.3680043.8.498"]
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            data = f.read_bytes().lower()
            for n in needles:
                assert n.lower().encode() not in data, (f, n)
    assert not (tmp_path / "out" / SALT_FILE).exists()


def test_breastmnist_and_nifti_volumes(data_dir, tmp_path, monkeypatch):
    import nibabel as nib

    monkeypatch.setenv("MEDFM_DATA", str(data_dir))
    s = prepare(
        "medmnist:breastmnist", tmp_path / "bm", _cfg(tmp_path, size=28, shard_size=512), progress=False
    )
    assert s["counts"]["split"] == {"test": 156, "train": 546, "val": 78} and s["n_shards"] == 2
    ds = PreparedDataset(tmp_path / "bm", split="val")
    assert len(ds) == 78 and int(ds.labels().sum()) == 57
    raw = np.load(data_dir / "medmnist" / "breastmnist.npz")["val_images"][0].astype(np.float32)
    ref = (raw - raw.min()) / (raw.max() - raw.min())
    assert np.abs(ds[0]["image"][0].numpy() - ref).max() <= 1 / 255 + 1e-6  # 28 -> 28: only min-max + uint8

    nif = tmp_path / "nii"
    (nif / "imagesTr").mkdir(parents=True)
    (nif / "labelsTr").mkdir()
    vol = np.zeros((10, 12, 8), np.float32)  # (x, y, z) on disk
    lab = np.zeros((10, 12, 8), np.uint8)
    vol[2:8, 3:9, 2:6] = 100.0
    lab[2:8, 3:9, 2:6] = 2
    lab[4:6, 5:7, 3:5] = 1
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol, aff), nif / "imagesTr" / "v_0000.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), nif / "labelsTr" / "v.nii.gz")
    s = prepare(
        nif,
        tmp_path / "v",
        _cfg(tmp_path, modality="mr", spacing=(1.0, 1.0, 1.0), volume_shape=(16, 16, 16)),
        progress=False,
    )
    item = PreparedDataset(tmp_path / "v")[0]
    assert s["n_cases"] == 1 and item["image"].shape == (1, 16, 16, 16) and item["mask"].shape == (16, 16, 16)
    assert set(np.unique(item["mask"].numpy())) == {0, 1, 2}  # nearest neighbour keeps label values
    # 2 mm slices resampled to 1 mm: the labelled block spans ~8 slices instead of 4.
    assert 7 <= int((item["mask"].numpy() > 0).any(axis=(1, 2)).sum()) <= 9
    img, m = item["image"][0].numpy(), item["mask"].numpy()
    assert img[m == 2].mean() > 0.9 and img[m == 0].mean() < 0.2


def test_cli_prepare_info_overview(tmp_path):
    src = _pngs(tmp_path / "src" / "siteA", 5)
    _pngs(tmp_path / "src" / "siteB", 3, size=(30, 18))
    r = CliRunner()
    res = r.invoke(
        app,
        [
            "data",
            "prepare",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "out"),
            "--size",
            "16",
            "--shard-size",
            "3",
            "--salt-file",
            str(tmp_path / "salt"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "prepared 8 cases (0 skipped, see" in res.output
    assert src.exists() and read_summary(tmp_path / "out")["n_shards"] == 3
    res = r.invoke(app, ["data", "info", str(tmp_path / "out")])
    assert res.exit_code == 0 and "n_cases" in res.output and "8" in res.output
    res = r.invoke(app, ["data", "overview", str(tmp_path / "out"), "--out", str(tmp_path / "o.html")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "o.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "http" not in page.replace("http-equiv", "")
    res = r.invoke(
        app, ["data", "prepare", str(tmp_path / "src"), "--out", str(tmp_path / "x"), "--spacing", "1,2"]
    )
    assert isinstance(res.exception, ConfigError) and "--spacing" in str(res.exception)


def test_phantom_folder_is_a_manifest_source(tmp_path):
    from medfm.data.phantom.generate import write_phantom

    write_phantom("cxr", 6, tmp_path / "ph", size=64)
    s = prepare(
        tmp_path / "ph", tmp_path / "out", _cfg(tmp_path, size=32, keep_identifiers=True), progress=False
    )
    raw = pd.read_csv(tmp_path / "ph" / "manifest.csv")
    assert s["n_cases"] == 6 and s["task"] == "multilabel" and s["modality"] == "xray"
    assert s["mask_label_names"]["1"] == "right_lung"
    ds = PreparedDataset(tmp_path / "out")
    man = ds.manifest.set_index("case_id")
    for i in range(2):
        item = ds[i]
        row = raw.set_index("case_id").loc[item["case_id"]]
        assert item["label"].tolist() == [float(row[c]) for c in s["label_columns"]]
        assert item["text"] == row["report"] and item["mask"].max() >= 2
        assert man.loc[item["case_id"], "split"] == row["split"]


def _cli_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`medfm ARGS` through the real entry point (user errors: one line on stderr, exit code 2)."""
    import sys

    from medfm.cli.app import main

    monkeypatch.setattr(sys, "argv", ["medfm", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


@pytest.mark.parametrize("kind", ["bad_files", "bad_rows"])
def test_nothing_prepared_still_writes_the_report_and_fails(tmp_path, monkeypatch, capsys, kind):
    # Issue 16 item 2: every file (or every manifest row) bad -> summary.json lists them, exit non-zero.
    src = tmp_path / "src"
    src.mkdir()
    if kind == "bad_files":
        (src / "a.png").write_bytes(b"")
        (src / "b.png").write_bytes(b"not a picture at all")
    else:
        (src / "a.png").write_bytes(b"")
        pd.DataFrame({"image": ["", " "], "tb": ["0", "1"]}).to_csv(src / "manifest.csv", index=False)
    out = tmp_path / "out"
    code, stdout, err = _cli_main(
        monkeypatch, capsys, "data", "prepare", str(src), "--out", str(out), "--size", "16",
        "--salt-file", str(tmp_path / "salt"),
    )
    assert code != 0 and len(err.strip().splitlines()) == 1 and "no case could be prepared" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 0 and summary["n_skipped"] == 2 == len(summary["skipped"])
    assert not (out / "progress.json").exists()
    if kind == "bad_rows":
        assert [r["row"] for r in summary["skipped"]] == [2, 3]
        assert all("empty 'image'" in r["error"] for r in summary["skipped"])
    # The same command again reports the same failure (not a crash, not a success).
    code, _, err = _cli_main(
        monkeypatch, capsys, "data", "prepare", str(src), "--out", str(out), "--size", "16",
        "--salt-file", str(tmp_path / "salt"),
    )
    assert code != 0 and "no case could be prepared" in err


def _volume(p: Path) -> None:
    import nibabel as nib

    vol = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(p))


@pytest.mark.parametrize("first", ["volume", "image"])
def test_mixed_2d_and_3d_is_refused_with_counts_whatever_the_order(tmp_path, monkeypatch, capsys, first):
    # Issue 16 item 8: the result used to depend on which file came first.
    src = _pngs(tmp_path / "src", 3)
    _volume(src / ("a_vol.nii.gz" if first == "volume" else "z_vol.nii.gz"))
    cfg = _cfg(tmp_path, size=16, volume_shape=(8, 8, 8), spacing=(2.0, 2.0, 2.0))
    with pytest.raises(InputError) as e:
        prepare(src, tmp_path / "out", cfg, progress=False)
    msg = str(e.value)
    assert "input mixes 3 2D images and 1 3D volume; prepare them separately (--dims 2 or --dims 3" in msg
    leftovers = {p.name for p in (tmp_path / "out").iterdir()} if (tmp_path / "out").exists() else set()
    assert not leftovers & {"images", "parts", "progress.json", "summary.json"}
    code, _, err = _cli_main(
        monkeypatch, capsys, "data", "prepare", str(src), "--out", str(tmp_path / "cli"), "--size", "16",
        "--volume-shape", "8,8,8", "--salt-file", str(tmp_path / "salt"),
    )
    assert code == 2 and "input mixes 3 2D images and 1 3D volume" in err and len(err.splitlines()) == 1


def test_dims_keeps_one_kind_and_lists_the_others(tmp_path):
    src = _pngs(tmp_path / "src", 3)
    _volume(src / "a_vol.nii.gz")
    kw = {"size": 16, "volume_shape": (8, 8, 8), "spacing": (2.0, 2.0, 2.0), "keep_identifiers": True}
    s2 = prepare(src, tmp_path / "d2", _cfg(tmp_path, dims=2, **kw), progress=False)
    assert s2["n_cases"] == 3 and s2["spatial_dims"] == 2 and s2["image_shape"] == [1, 16, 16]
    assert [r["error"] for r in s2["skipped"]] == [
        f"{src / 'a_vol.nii.gz'}: is 3D (--dims 2 keeps only 2D cases)"
    ]
    s3 = prepare(src, tmp_path / "d3", _cfg(tmp_path, dims=3, **kw), progress=False)
    assert s3["n_cases"] == 1 and s3["spatial_dims"] == 3 and s3["image_shape"] == [1, 8, 8, 8]
    assert len(s3["skipped"]) == 3
    assert all("is 2D (--dims 3 keeps only 3D cases)" in r["error"] for r in s3["skipped"])
    assert s3["settings"]["dims"] == 3
    with pytest.raises(ConfigError, match="--dims must be 2 or 3"):
        prepare(src, tmp_path / "d4", _cfg(tmp_path, dims=4, **kw), progress=False)
