"""Preprocessing replay: a raw file through `load_input` equals its prepared twin from `PreparedDataset`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from badinputs import make_dicom, write_png
from medfm.data.prepare import PrepareConfig, prepare
from medfm.data.preprocess import load_input, make_spec, preprocess_sample, preprocessing_of
from medfm.data.sample import Sample
from medfm.data.store import PreparedDataset, read_summary


def _by_source(ds: PreparedDataset, root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(len(ds)):
        src = str(ds.manifest["source"][i])
        out[str(root / src) if not Path(src).is_absolute() else src] = ds[i]["image"]
    return out


def _prepare(src: Path, out: Path, tmp: Path, **kw) -> PreparedDataset:
    cfg = PrepareConfig(size=48, shard_size=4, keep_identifiers=True, salt_file=str(tmp / "salt"), **kw)
    s = prepare(src, out, cfg, progress=False)
    assert s["n_skipped"] == 0, s["skipped"]
    return PreparedDataset(out)


def test_png_and_dicom_raw_equals_prepared(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "raw"
    src.mkdir()
    write_png(src / "wide.png", rng.integers(0, 256, (30, 50), dtype=np.uint8))
    write_png(src / "rgb.png", rng.integers(0, 256, (3, 40, 40), dtype=np.uint8))
    write_png(src / "grey16.png", rng.integers(0, 4000, (33, 21), dtype=np.uint16))
    make_dicom(src / "ct.dcm", rng.integers(0, 3000, (40, 36)), slope=1.0, intercept=-1024.0)
    make_dicom(src / "dx.dcm", rng.integers(0, 4096, (25, 45)), modality="DX")
    ds = _prepare(src, tmp_path / "out", tmp_path)
    spec = preprocessing_of(tmp_path / "out")
    recorded = read_summary(tmp_path / "out")["preprocessing"]
    assert {k: v for k, v in recorded.items() if k != "normalisation_applied"} == spec
    # Issue 16 item 10: the summary says which normalisation each kind of case got, and why.
    assert recorded["normalisation_applied"] == [
        {"normalisation": "min-max", "reason": "8-bit source, already display-scaled", "cases": 2},
        {"normalisation": "percentile 0.5-99.5", "reason": "uint16 source, robust to outliers", "cases": 2},
        {"normalisation": "window -1000..1000 HU", "reason": "CT with values in HU", "cases": 1},
    ]
    got = _by_source(ds, src)
    assert len(got) == 5
    for path, prepared in got.items():
        raw = load_input(path, spec)
        assert raw.dtype == torch.float32 and raw.shape == prepared.shape == (1, 48, 48)
        assert torch.equal(raw, prepared), path  # bit-identical, including uint8 quantisation
    # The replay matters: another spec (different size) gives a different tensor.
    assert load_input(src / "wide.png", dict(spec, size=32)).shape == (1, 32, 32)


def test_nifti_volume_raw_equals_prepared(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    src = tmp_path / "vols"
    src.mkdir()
    for k in range(2):
        vol = rng.normal(0, 300, (20, 18, 12)).astype(np.float32) - 200 * k
        nib.save(nib.Nifti1Image(vol, np.diag([2.0, 1.5, 3.0, 1.0])), src / f"v{k}.nii.gz")
    ds = _prepare(src, tmp_path / "out", tmp_path, volume_shape=(16, 16, 16))
    spec = preprocessing_of(tmp_path / "out")
    got = _by_source(ds, src)
    assert len(got) == 2
    for path, prepared in got.items():
        raw = load_input(path, spec)
        assert raw.shape == prepared.shape == (1, 16, 16, 16)
        assert torch.equal(raw, prepared), path


def test_old_store_without_spec_rebuilds_it(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    write_png(src / "a.png", np.arange(30 * 20, dtype=np.uint16).reshape(30, 20) % 251)
    _prepare(src, tmp_path / "out", tmp_path, resize_mode="crop", channels=3)
    new = preprocessing_of(tmp_path / "out")
    p = tmp_path / "out" / "summary.json"
    old = json.loads(p.read_text())
    del old["preprocessing"]  # what today's main writes
    p.write_text(json.dumps(old))
    rebuilt = preprocessing_of(tmp_path / "out")
    # Such a store was normalised by modality alone: its replay keeps that rule.
    assert rebuilt == dict(new, normalisation="legacy")
    assert rebuilt["resize_mode"] == "crop" and rebuilt["channels"] == 3


def test_preprocess_sample_mask_and_spec_keys() -> None:
    img = Sample(array=np.arange(20 * 10, dtype=np.uint8).reshape(1, 20, 10), spacing=(1.0, 1.0))
    mask = np.zeros((20, 10), np.uint8)
    mask[5:15, 2:8] = 255
    spec = make_spec(size=16)
    stored, m = preprocess_sample(img, spec, mask=mask)
    assert stored.dtype == np.uint8 and stored.shape == (1, 16, 16)
    assert m.dtype == np.uint8 and set(np.unique(m).tolist()) == {0, 1}
    assert np.array_equal(preprocess_sample(img, spec), stored)
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        make_spec(sise=16)


# ------------------------------------------------------------ issue 16 item 10: never HU-window non-HU data
def _medmnist_3d_masks(path: Path) -> Path:
    """A MedMNIST-layout 3D archive of uint8 0/255 masks (the organmnist3d name makes the importer say CT)."""
    rng = np.random.default_rng(0)
    vols = {s: (rng.random((n, 8, 8, 8)) > 0.7).astype(np.uint8) * 255 for s, n in (("train", 3), ("val", 1))}
    np.savez(
        path,
        **{f"{s}_images": v for s, v in vols.items()},
        **{f"{s}_labels": np.zeros((len(v), 1), np.uint8) for s, v in vols.items()},
    )
    return path


def test_uint8_medmnist_volume_is_not_hu_windowed(tmp_path: Path) -> None:
    npz = _medmnist_3d_masks(tmp_path / "organmnist3d.npz")
    cfg = PrepareConfig(spacing=(1.0, 1.0, 1.0), volume_shape=(8, 8, 8), dtype="float16", shard_size=8,
                        keep_identifiers=True, salt_file=str(tmp_path / "salt"))
    s = prepare(f"medmnist:{npz}", tmp_path / "out", cfg, progress=False)
    assert s["n_cases"] == 4 and s["modality"] == "ct"
    assert read_summary(tmp_path / "out")["preprocessing"]["normalisation_applied"] == [
        {"normalisation": "min-max", "reason": "uint8 source, not HU", "cases": 4}]
    ds = PreparedDataset(tmp_path / "out")
    values = set(np.unique(ds[0]["image"].numpy()).tolist())
    assert values == {0.0, 1.0}  # min-max; the HU window gave 0.5 / 0.6275
    notes = ds.manifest["reader_notes"].tolist()
    assert all("note_normalisation: min-max (uint8 source, not HU)" in n for n in notes)
    assert all("modality ct but values 0..255 (uint8) are not HU; min-max used" in n for n in notes)


def _rec(array: np.ndarray, meta: dict, modality: str | None = None) -> dict:
    from medfm.data.preprocess import normalisation_for

    return normalisation_for(Sample(array=array, spacing=(1.0,) * (array.ndim - 1), meta=meta),
                             make_spec(modality=modality))


def test_normalisation_decision_and_reason() -> None:
    hu = np.linspace(-1024, 2000, 2 * 8 * 8, dtype=np.float32).reshape(1, 2, 8, 8)
    assert _rec(hu, {"format": "dicom", "modality": "CT"}) == {
        "method": "window", "normalisation": "window -1000..1000 HU", "reason": "CT with values in HU"}
    png = np.arange(64, dtype=np.uint8).reshape(1, 8, 8)
    r = _rec(png, {"format": "png"}, modality="ct")
    assert (r["normalisation"], r["reason"]) == ("min-max", "PNG source, not HU")
    assert r["warning"] == "modality ct but values 0..63 (uint8) are not HU; min-max used"
    raw = np.arange(0, 4096, 64, dtype=np.uint16).reshape(1, 8, 8)  # CT without its rescale intercept
    r = _rec(raw, {"format": "dicom", "modality": "CT"})
    assert r["method"] == "percentile" and "not HU" in r["reason"] and "warning" in r
    mr = _rec(hu, {"format": "nifti"}, modality="mr")
    assert mr["warning"].startswith("modality mr but values -1024..")
    assert _rec(png, {"format": "png"}) == {
        "method": "minmax", "normalisation": "min-max", "reason": "8-bit source, already display-scaled"}


def test_normalisation_record_tallies_cases() -> None:
    from medfm.data.preprocess import normalisation_record

    notes = ["note_normalisation: min-max (uint8 source, not HU); modality ct but ...",
             "note_extension: x; note_normalisation: min-max (uint8 source, not HU)",
             "note_normalisation: window -1000..1000 HU (CT with values in HU)", ""]
    rec = normalisation_record(make_spec(), notes)
    assert rec["normalisation_applied"] == [
        {"normalisation": "min-max", "reason": "uint8 source, not HU", "cases": 2},
        {"normalisation": "window -1000..1000 HU", "reason": "CT with values in HU", "cases": 1},
    ]
    assert rec["normalisation"] == "auto"
