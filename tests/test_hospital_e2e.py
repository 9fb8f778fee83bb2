"""The hospital path end to end with real parts: a chest X-ray stored in a real Orthanc is pulled by the
watcher, classified and segmented by real served models, and its SR + SEG + overlay go back into the study,
where a QIDO search finds them; the SEG's mask is the model's mask and the SR's probability the model's."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

import serve_world
from orthanc_server import FAKE_PATIENT, cxr_dicom, orthanc_fixture

orthanc = pytest.fixture(scope="module")(orthanc_fixture)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from medfm.serve.engine import Engine

    world = serve_world.build(tmp_path_factory.mktemp("served"))
    return Engine.load([world["tb"], world["lungs"]])


def _numbers(sr: pydicom.Dataset) -> list[float]:
    """Every numeric measurement value in an SR content tree."""
    out: list[float] = []

    def walk(items) -> None:
        for it in items:
            if getattr(it, "ValueType", "") == "NUM":
                out.append(float(it.MeasuredValueSequence[0].NumericValue))
            walk(getattr(it, "ContentSequence", []))

    walk(sr.ContentSequence)
    return out


def test_store_pull_classify_segment_store_back_find(orthanc, engine, tmp_path):
    import highdicom as hd

    from medfm.pacs.client import Pacs
    from medfm.pacs.watch import Watcher

    pacs = Pacs(orthanc.url, *orthanc.auth)
    src = cxr_dicom(7)
    pacs.store([src])
    lines: list[str] = []
    w = Watcher(pacs, engine.analyse_dicom, tmp_path / "state", log=lines.append)
    first = w.run_once()
    assert first["processed"] == 1 and first["delivered"] >= 1 and first["errors"] == 0, first
    assert w.run_once()["processed"] == 0  # its own results are not analysed again

    study = str(src.StudyInstanceUID)
    found = {r["Modality"]: r for r in pacs.find_results(study)}
    assert {"SR", "SEG"} <= set(found), found

    def fetch(row):
        return pacs.retrieve_instance(study, row["SeriesInstanceUID"], row["SOPInstanceUID"])

    sr, seg = fetch(found["SR"]), fetch(found["SEG"])
    assert src.SOPInstanceUID in str(sr) and sr.PatientID == FAKE_PATIENT["PatientID"]  # filed with its study
    # the same numbers the models give on the same instance
    direct = engine.analyse_dicom(pydicom.dcmread(_saved(src, tmp_path)))
    probs = [f["probability"] for f in direct.findings]
    assert np.allclose(sorted(_numbers(sr)), sorted(probs), atol=1e-4)
    seg_mask = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        [src.SOPInstanceUID], combine_segments=True)[0]
    expected = direct.mask
    assert seg_mask.shape == expected.shape == (src.Rows, src.Columns)
    inter = np.logical_and(seg_mask > 0, expected > 0).sum()
    dice = 2 * inter / max(1, (seg_mask > 0).sum() + (expected > 0).sum())
    assert dice > 0.999 and (expected > 0).mean() > 0.05
    assert src.SOPInstanceUID in str(seg)  # the SEG references its source image
    for text in lines:
        for v in FAKE_PATIENT.values():
            assert v not in text


def _saved(ds: pydicom.Dataset, tmp_path) -> str:
    p = tmp_path / "src.dcm"
    ds.save_as(p, enforce_file_format=True)
    return str(p)
