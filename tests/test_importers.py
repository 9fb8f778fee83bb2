"""Importers: each known layout becomes a normalised manifest that prepare consumes."""

from __future__ import annotations

import numpy as np
import pytest

from badinputs import make_dicom
from medfm.data.importers import IMPORTERS, resolve_source
from medfm.errors import InputError


def test_breastmnist_official_split_and_labels(data_dir, monkeypatch):
    monkeypatch.setenv("MEDFM_DATA", str(data_dir))
    m = resolve_source("medmnist:breastmnist")
    df = m.df
    assert df["split"].value_counts().to_dict() == {"train": 546, "test": 156, "val": 78}
    assert m.label_columns == ["label"] and m.task == "binary" and m.modality == "us"
    # SOURCE.txt: labels (0 malignant, 1 normal+benign) train 147/399, val 21/57, test 42/114.
    counts = df.groupby(["split", "label"]).size().to_dict()
    assert counts == {
        ("test", 0): 42,
        ("test", 1): 114,
        ("train", 0): 147,
        ("train", 1): 399,
        ("val", 0): 21,
        ("val", 1): 57,
    }
    assert df["case_id"].is_unique
    # A direct path to the npz file is recognised too.
    assert len(resolve_source(data_dir / "medmnist" / "breastmnist.npz")) == 780


def test_medmnist_missing_and_offline_download_fail_clearly(tmp_path):
    with pytest.raises(InputError, match=r"pathmnist\.npz not found in .*") as e:
        IMPORTERS.create("medmnist", arg="pathmnist", root=tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError) as e:
        IMPORTERS.create("medmnist", arg="pathmnist", root=tmp_path, download=True)
    msg = str(e.value)
    assert "\n" not in msg and ("medmnist' package" in msg or "download failed" in msg)


def test_medmnist_3d_and_multilabel_layouts(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "organmnist3d_64.npz",
        train_images=rng.integers(0, 255, (4, 8, 8, 8), dtype=np.uint8),
        train_labels=np.arange(4)[:, None],
        test_images=rng.integers(0, 255, (2, 8, 8, 8), dtype=np.uint8),
        test_labels=np.array([[1], [3]]),
    )
    m = IMPORTERS.create("medmnist", arg="organmnist3d_64", root=tmp_path)
    assert len(m) == 6 and m.task == "multiclass" and m.modality == "ct"
    assert m.df["image"][0].endswith("organmnist3d_64.npz::train_images/0")
    np.savez(
        tmp_path / "chestmnist.npz",
        train_images=np.zeros((3, 28, 28), np.uint8),
        train_labels=np.eye(3, 14, dtype=np.uint8),
    )
    m = IMPORTERS.create("medmnist", arg="chestmnist", root=tmp_path)
    assert m.task == "multilabel" and len(m.label_columns) == 14 and m.df["label_1"].tolist() == [0, 1, 0]


def test_cxr_lung_seg_layout(data_dir):
    m = resolve_source(data_dir / "cxr_lung_seg")
    df = m.df
    assert len(df) == 704 and m.label_columns == ["tuberculosis"] and m.task == "binary"
    assert df["site"].value_counts().to_dict() == {"shenzhen": 566, "montgomery": 138}
    assert (df["mask"] != "").all() and set(df["split"]) == {"train", "val", "test"}
    assert m.missing_files() == []


def test_covid_cxr_notes_layout(data_dir):
    m = resolve_source(data_dir / "covid_cxr_notes")
    df = m.df
    assert len(df) == 482 and df["patient_id"].nunique() == 291
    assert (df["report"].str.len() > 0).all()
    assert df["site"].nunique() > 50  # location -> site
    assert set(df["sex"]) == {"M", "F", ""}
    assert (df["sex"] == "M").sum() == 269 and (df["sex"] == "F").sum() == 170
    assert m.label_columns == ["covid19"] and set(df["covid19"]) == {-1, 0, 1}
    assert (df["covid19"] == -1).sum() == 62  # finding "todo" stays unlabelled
    assert "finding" in m.extra_columns() and "view" in m.extra_columns()


def _nii(path, arr, zooms=(1.0, 1.0, 1.0)):
    import nibabel as nib

    img = nib.Nifti1Image(arr, np.diag([*zooms, 1.0]))
    nib.save(img, str(path))


def test_nifti_nnunet_and_flat_layouts(tmp_path):
    root = tmp_path / "Task"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    for c in ("c1", "c2"):
        _nii(root / "imagesTr" / f"{c}_0000.nii.gz", np.zeros((4, 4, 4), np.float32))
        _nii(root / "imagesTr" / f"{c}_0001.nii.gz", np.zeros((4, 4, 4), np.float32))
        _nii(root / "labelsTr" / f"{c}.nii.gz", np.zeros((4, 4, 4), np.uint8))
    _nii(root / "imagesTs" / "t1_0000.nii.gz", np.zeros((4, 4, 4), np.float32))
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"}}')
    m = resolve_source(root)
    df = m.df.set_index("case_id")
    assert sorted(df.index) == ["c1", "c2", "t1"] and m.modality == "ct"
    assert df.loc["c1", "mask"].endswith("labelsTr/c1.nii.gz") and df.loc["t1", "mask"] == ""
    assert df.loc["t1", "split"] == "test" and df.loc["c1", "split"] == ""

    flat = tmp_path / "flat"
    flat.mkdir()
    _nii(flat / "a_img.nii.gz", np.zeros((4, 4, 4), np.float32))
    _nii(flat / "a_seg.nii.gz", np.zeros((4, 4, 4), np.uint8))
    _nii(flat / "b_img.nii.gz", np.zeros((4, 4, 4), np.float32))
    m = IMPORTERS.create("nifti", arg=str(flat))
    df = m.df.set_index("case_id")
    assert df.loc["a", "mask"].endswith("a_seg.nii.gz") and df.loc["b", "mask"] == ""


def test_folder_scan_groups_dicom_series_and_skips_mask_dirs(tmp_path):
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "x.png").write_bytes(b"x")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "x.png").write_bytes(b"x")
    series = tmp_path / "study" / "series1"
    series.mkdir(parents=True)
    img = np.zeros((4, 4), np.uint16)
    for i in range(3):  # extensionless DICOM files of one series
        make_dicom(series / f"IM{i}", img, series_uid="1.2.3.4", instance=i + 1, position=(0, 0, i))
    two = tmp_path / "two"
    two.mkdir()
    for i in range(4):  # two series in one folder, plus a standalone radiograph
        make_dicom(two / f"{i}.dcm", img, series_uid=f"1.2.3.{5 + i % 2}", instance=i, position=(0, 0, i))
    make_dicom(two / "xray.dcm", img, modality="DX")
    m = resolve_source(tmp_path)
    assert sorted(m.df["case_id"]) == ["pngs/x", "study/series1", "two/series/0", "two/series/1", "two/xray"]
    assert (m.df["patient_id"] != "").sum() == 4  # PatientID from the headers (hashed later by prepare)
    d = IMPORTERS.create("dicom", arg=str(tmp_path))
    assert sorted(d.df["case_id"]) == ["study/series1", "two/series/0", "two/series/1", "two/xray"]
    with pytest.raises(InputError, match="source not found"):
        resolve_source(tmp_path / "nothing")


def _tiny_medmnist(path, side=28, n=6):
    rng = np.random.default_rng(1)
    np.savez(path, train_images=rng.integers(0, 256, (n, side, side), dtype=np.uint8),
             train_labels=(np.arange(n) % 2)[:, None], val_images=np.zeros((2, side, side), np.uint8),
             val_labels=np.zeros((2, 1), np.uint8))
    return path


def test_medmnist_local_file_form_and_source_size(tmp_path, monkeypatch):
    """Issue 16 item 11: medmnist:/path/file.npz reads a local file; --size defaults to its own 28 px."""
    from medfm.data.importers import default_size
    from medfm.data.prepare import PrepareConfig, prepare

    npz = _tiny_medmnist(tmp_path / "pneumoniamnist.npz")
    m = resolve_source(f"medmnist:{npz}")
    assert len(m) == 8 and m.modality == "xray" and default_size(m) == 28
    monkeypatch.chdir(tmp_path)  # the relative form works too
    assert len(resolve_source("medmnist:pneumoniamnist.npz")) == 8
    with pytest.raises(InputError, match=r"missing\.npz: MedMNIST file not found \(medmnist:PATH needs"):
        resolve_source(f"medmnist:{tmp_path / 'missing.npz'}")
    s = prepare(f"medmnist:{npz}", tmp_path / "out", PrepareConfig(salt_file=str(tmp_path / "salt")),
                progress=False)
    assert s["image_shape"] == [1, 28, 28] and s["preprocessing"]["size"] == 28  # not upsampled to 224
    s = prepare(f"medmnist:{npz}", tmp_path / "o2", PrepareConfig(size=32, salt_file=str(tmp_path / "salt")),
                progress=False)
    assert s["image_shape"] == [1, 32, 32]  # an explicit --size still wins


def test_default_size_is_224_for_other_sources(tmp_path):
    from badinputs import write_png
    from medfm.data.importers import default_size

    write_png(tmp_path / "a.png", np.zeros((28, 28), np.uint8))
    assert default_size(resolve_source(tmp_path)) == 224
    vol = tmp_path / "organmnist3d.npz"
    np.savez(vol, train_images=np.zeros((2, 8, 8, 8), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    assert default_size(resolve_source(f"medmnist:{vol}")) == 224  # volumes keep --spacing/--volume-shape


def test_input_contract_manifest_example_prepares(tmp_path):
    """docs/input-contract.md's image + mask example is real: it prepares as the document says."""
    import json
    import re
    from pathlib import Path

    from badinputs import write_png
    from medfm.data.prepare import PrepareConfig, prepare

    doc = (Path(__file__).resolve().parents[1] / "docs" / "input-contract.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", doc, re.S)
    table = next(b for b in blocks if b.startswith("image,mask,label"))
    info = json.loads(next(b for b in blocks if b.startswith('{"label_columns"')))
    root = tmp_path / "lungs"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for case in ("case001", "case002"):
        write_png(root / "images" / f"{case}.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
        write_png(root / "masks" / f"{case}.png", (rng.random((32, 32)) > 0.5).astype(np.uint8) * 255)
    (root / "manifest.csv").write_text(table + "Legend: label 1 = tuberculosis,,,,,,,\n")
    (root / "dataset.json").write_text(json.dumps(info))
    s = prepare(root / "manifest.csv", tmp_path / "prepared", PrepareConfig(size=16, keep_identifiers=True,
                salt_file=str(tmp_path / "salt")), progress=False)
    assert s["n_cases"] == 2 and s["has_masks"] and s["task"] == "binary"
    assert s["n_skipped"] == 1
    assert "Legend: label 1 = tuberculosis: file not found" in s["skipped"][0]["error"]
