"""De-identification: identifiers never reach Sample.meta or written outputs unless explicitly asked for."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from badinputs import FAKE_IDENTIFIERS, make_dicom
from medfm.data.deid import (
    deidentify_meta,
    dicom_identifiers,
    hash_id,
    is_identifier_key,
    load_or_create_salt,
)
from medfm.data.read import read, read_series
from medfm.rundir import write_json

SERIES = "volumes_3d/dicom_series_vs_seg_001"


def _written_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def _write_outputs(sample, out: Path) -> None:
    """What a pipeline writes for a case: meta as JSON, array as .npy, and a text listing."""
    write_json(out / "meta.json", sample.meta)
    np.save(out / "array.npy", sample.array)
    (out / "listing.txt").write_text(repr(sample.meta) + "\n" + str(sample.spacing) + str(sample.orientation))


def test_real_dicom_identifiers_never_written(data_dir: Path, tmp_path: Path) -> None:
    folder = data_dir / SERIES
    files = sorted(folder.glob("*.dcm"))
    ids: set[str] = set()
    for f in files:
        ids.update(v for v in dicom_identifiers(pydicom.dcmread(f, stop_before_pixels=True)).values())
    ids = {v for v in ids if len(v) >= 6}  # ignore trivially short values that occur by chance
    assert any("VS-SEG-001" in v for v in ids)  # patient name/ID of the TCIA case
    assert any(v.startswith("1.3.6.1.4.1.14519") for v in ids)  # instance/series/study UIDs
    assert "19940904" in ids  # study date
    out = tmp_path / "out"
    _write_outputs(read_series(folder), out / "series")
    _write_outputs(read(files[0]), out / "slice")
    blob = _written_bytes(out)
    leaked = [v for v in ids if v.encode() in blob]
    assert leaked == []
    meta = read_series(folder).meta
    assert "patient_sex" in meta and meta["patient_age"] == 60  # non-identifying demographics kept


def test_keep_identifiers_goes_under_identifiers(tmp_path: Path) -> None:
    p = make_dicom(tmp_path / "x.dcm", np.zeros((8, 8), np.uint16))
    s = read(p)
    assert "identifiers" not in s.meta
    assert not any(v in json.dumps(s.meta) for v in FAKE_IDENTIFIERS.values())
    k = read(p, keep_identifiers=True)
    assert k.meta["identifiers"]["PatientName"] == "Doe^Jane"
    assert k.meta["identifiers"]["PatientBirthDate"] == "19510214"
    assert "SOPClassUID" not in k.meta["identifiers"]  # a standard class UID is not an identifier
    clean = deidentify_meta(k.meta)
    assert "identifiers" not in clean and clean["modality"] == "CT"


def test_hash_id_stable_and_salted() -> None:
    a = hash_id("MRN-1", "salt1")
    assert a == hash_id("MRN-1", "salt1") and a.startswith("p_") and len(a) == 18
    assert a != hash_id("MRN-1", "salt2") and a != hash_id("MRN-2", "salt1")
    with pytest.raises(ValueError):
        hash_id("x", "")


def test_salt_created_once_and_private(tmp_path: Path) -> None:
    s1 = load_or_create_salt(tmp_path / "d")
    s2 = load_or_create_salt(tmp_path / "d")
    assert s1 == s2 and len(s1) >= 32
    mode = os.stat(tmp_path / "d" / ".medfm_salt").st_mode & 0o777
    assert mode == 0o600
    assert load_or_create_salt(tmp_path / "e") != s1


def test_deidentify_meta_nested_and_pseudonyms() -> None:
    meta = {
        "modality": "CT", "PatientName": "Doe^Jane", "patient_id": "MRN-7", "StudyDate": "20200101",
        "acquisition_time": "101010", "SeriesInstanceUID": "1.2.3.4", "InstitutionName": "X Hospital",
        "window": {"center": 40, "width": 400}, "echo_time": 2.9,
        "history": [{"ReferringPhysicianName": "Dr A", "ok": 1}],
        "identifiers": {"AccessionNumber": "ACC1"},
    }
    clean = deidentify_meta(meta)
    text = json.dumps(clean)
    for v in ("Doe^Jane", "MRN-7", "20200101", "101010", "1.2.3.4", "X Hospital", "Dr A", "ACC1"):
        assert v not in text
    assert clean["window"] == {"center": 40, "width": 400} and clean["echo_time"] == 2.9
    assert clean["history"] == [{"ok": 1}]
    pseudo = deidentify_meta(meta, salt="s3cret")
    assert pseudo["patient_id"] == hash_id("MRN-7", "s3cret", "p_")
    assert pseudo["SeriesInstanceUID"].startswith("se_") and "PatientName" not in pseudo
    kept = deidentify_meta(meta, keep_identifiers=True)
    assert kept["identifiers"]["PatientName"] == "Doe^Jane"
    assert kept["identifiers"]["AccessionNumber"] == "ACC1"
    assert "PatientName" not in kept


@pytest.mark.parametrize("key,expected", [("PatientID", True), ("StudyDate", True), ("ContentTime", True),
                                          ("study_uid", True), ("SOPClassUID", False), ("EchoTime", False),
                                          ("modality", False), ("patient_sex", False)])
def test_identifier_keys(key: str, expected: bool) -> None:
    assert is_identifier_key(key) is expected
