"""medfm.pacs against a real Orthanc: DICOMweb round trip, SR/SEG/SC results, the watcher (with an outage in
the middle), PACS errors as one line, and no patient identifier in anything medfm writes locally."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfm.errors import PacsError
from medfm.pacs import InstanceResult, Pacs, Watcher, build_results, findings_sr, mask_seg, overlay_sc, pull
from medfm.pacs.types import is_medfm_result, uid_key
from orthanc_server import FAKE_PATIENT, cxr_dicom, orthanc_fixture, running_orthanc

orthanc = pytest.fixture(scope="module")(orthanc_fixture)
FINDINGS = [{"name": "tuberculosis", "probability": 0.83, "positive": True},
            {"name": "pleural effusion", "probability": 0.12, "positive": False}]
MODEL = {"name": "tb-test", "hash": "0123abcd", "version": "1"}


@pytest.fixture
def own_orthanc():
    """A server of the test's own: the watcher looks at every study on the PACS."""
    yield from running_orthanc()


def _pacs(server) -> Pacs:
    return Pacs(server.url, *server.auth, timeout=5)


def _analyse(ds: pydicom.Dataset) -> InstanceResult:
    """A stand-in model: lungs = darker half of the pixels, fixed findings."""
    px = ds.pixel_array
    mask = (px < np.median(px)).astype(np.uint8)
    return InstanceResult(ds, FINDINGS, mask, ["lung"], MODEL)


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(_bytes(ds)))


def _assert_no_identifiers(blobs: list[bytes], where: str) -> None:
    for value in FAKE_PATIENT.values():
        assert not any(value.encode() in b for b in blobs), f"{value} found in {where}"


def _tree_bytes(folder: Path) -> list[bytes]:
    paths = list(folder.rglob("*"))
    return [p.read_bytes() for p in paths if p.is_file()] + [str(p).encode() for p in paths]


def test_store_search_retrieve(orthanc):
    pacs, ds = _pacs(orthanc), cxr_dicom(0)
    assert pacs.store([ds]) == [ds.SOPInstanceUID]
    rows = pacs.studies(StudyInstanceUID=ds.StudyInstanceUID)
    assert rows == [{"StudyInstanceUID": ds.StudyInstanceUID, "StudyDate": "20240301",
                     "ModalitiesInStudy": "DX", "NumberOfStudyRelatedInstances": 1}]
    [with_ids] = pacs.studies(identifiers=True, StudyInstanceUID=ds.StudyInstanceUID)
    assert with_ids["PatientID"] == "P-TEST-001"
    [inst] = pacs.instances(ds.StudyInstanceUID)
    assert inst["SOPInstanceUID"] == ds.SOPInstanceUID and inst["Modality"] == "DX"
    back = pacs.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
    assert [b.SOPInstanceUID for b in pacs.retrieve_study(ds.StudyInstanceUID)] == [ds.SOPInstanceUID]


def test_results_valid_stored_and_found(orthanc):
    import highdicom as hd

    pacs, ds = _pacs(orthanc), cxr_dicom(1)
    pacs.store([ds])
    result = _analyse(ds)
    sr, seg, sc = findings_sr(result), mask_seg(result), overlay_sc(result)
    for obj in (sr, seg, sc):
        back = _roundtrip(obj)
        assert back.StudyInstanceUID == ds.StudyInstanceUID and back.PatientID == ds.PatientID
        assert back.SeriesInstanceUID != ds.SeriesInstanceUID and is_medfm_result(back)
    # SR: one measurement group per finding, probability and presence, referencing the source image
    report = hd.sr.srread(io.BytesIO(_bytes(sr)))
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    groups = report.content.get_image_measurement_groups()
    assert [g.finding_type.meaning for g in groups] == ["tuberculosis", "pleural effusion"]
    assert [g.get_measurements()[0].value for g in groups] == [0.83, 0.12]
    assert [g.get_qualitative_evaluations()[0].value.meaning for g in groups] == ["Present", "Absent"]
    assert groups[0].source_images[0].referenced_sop_instance_uid == ds.SOPInstanceUID
    # SEG: read back by highdicom, the same mask on the source's pixel grid
    segread = hd.seg.segread(io.BytesIO(_bytes(seg)))
    assert segread.get_segment_numbers() == [1]
    assert segread.get_segment_description(1).segment_label == "lung"
    pixels = segread.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, ..., 0], result.mask)
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    # SC: RGB, same size, mask tinted
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape == (ds.Rows, ds.Columns, 3)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    # rebuilding gives the same UIDs: a redelivery is stored once
    assert [o.SOPInstanceUID for o in build_results(result)] == [sr.SOPInstanceUID, seg.SOPInstanceUID,
                                                                 sc.SOPInstanceUID]
    pacs.store([sr, seg, sc])
    found = {r["Modality"]: r["SOPInstanceUID"] for r in pacs.find_results(ds.StudyInstanceUID)}
    assert found == {"SR": sr.SOPInstanceUID, "SEG": seg.SOPInstanceUID, "OT": sc.SOPInstanceUID}


def test_watcher_end_to_end(own_orthanc, tmp_path):
    pacs = _pacs(own_orthanc)
    good = cxr_dicom(2)
    bad = cxr_dicom(3, study_uid=good.StudyInstanceUID, instance=2)
    pacs.store([good, bad])

    def analyse(ds):
        if ds.InstanceNumber == 2:
            raise RuntimeError("model could not read this image")
        return _analyse(ds)

    lines: list[str] = []
    watcher = Watcher(pacs, analyse, tmp_path / "state", log=lines.append)
    s = watcher.run_once()
    assert (s["new"], s["processed"], s["delivered"], s["queued"], s["errors"]) == (2, 1, 1, 0, 1)
    assert s["pacs_error"] is None
    found = {r["Modality"] for r in pacs.find_results(good.StudyInstanceUID)}
    assert found == {"SR", "SEG", "OT"}
    assert len(lines) == 1 and uid_key(bad.SOPInstanceUID, "i_") in lines[0] and "\n" not in lines[0]
    again = watcher.run_once()
    assert (again["new"], again["processed"], again["delivered"], again["errors"]) == (0, 0, 0, 0)
    _assert_no_identifiers(_tree_bytes(tmp_path / "state"), "the watch state")
    _assert_no_identifiers([line.encode() for line in lines], "the log")


def test_watcher_survives_outage_and_restart(own_orthanc, tmp_path):
    pacs, state = _pacs(own_orthanc), tmp_path / "state"
    first = cxr_dicom(4)
    second = cxr_dicom(5, study_uid=first.StudyInstanceUID, instance=2)
    pacs.store([first, second])

    def analyse_then_outage(ds):
        own_orthanc.stop()  # the PACS goes down while the model runs: the results cannot be stored
        return _analyse(ds)

    lines: list[str] = []
    watcher = Watcher(pacs, analyse_then_outage, state, log=lines.append)
    s = watcher.run_once()
    assert s["processed"] == 1 and s["delivered"] == 0 and s["queued"] == 1
    assert "not reachable" in s["pacs_error"] and "\n" not in s["pacs_error"]
    down = watcher.run_once()  # still down: nothing lost, nothing logged twice
    assert down["queued"] == 1 and down["pacs_error"] and len(lines) == 1
    assert watcher.delay() > watcher.poll_s  # backing off
    _assert_no_identifiers(_tree_bytes(state), "the outbox")  # patient attributes are not queued

    own_orthanc.restart()
    fresh = Watcher(pacs, _analyse, state, log=lines.append)  # a new process: state from state_dir only
    back = fresh.run_once()
    assert back["pacs_error"] is None and back["queued"] == 0
    assert back["delivered"] == 2 and back["processed"] == 1  # the queued one, then the second instance
    assert watcher.run_once()["new"] == 0 and watcher.delay() == watcher.poll_s
    assert len(lines) == 2 and "reachable again" in lines[1]  # the watcher that saw the outage says so
    results = pacs.find_results(first.StudyInstanceUID)
    assert sorted(r["Modality"] for r in results) == ["OT", "OT", "SEG", "SEG", "SR", "SR"]
    # the delivered results carry the patient attributes again, so the PACS files them under the patient
    sr_row = next(r for r in results if r["Modality"] == "SR")
    sr = pacs.retrieve_instance(first.StudyInstanceUID, sr_row["SeriesInstanceUID"], sr_row["SOPInstanceUID"])
    assert (sr.PatientID, str(sr.PatientName), sr.AccessionNumber) == ("P-TEST-001", "Test^Patient",
                                                                       "ACC-TEST-7731")
    assert fresh.run_once()["new"] == 0
    _assert_no_identifiers(_tree_bytes(state), "the watch state")
    _assert_no_identifiers([line.encode() for line in lines], "the log")


def test_pull_resumes_without_identifiers_in_paths(orthanc, tmp_path):
    pacs, ds = _pacs(orthanc), cxr_dicom(6)
    pacs.store([ds])
    lines: list[str] = []
    paths = pull(pacs, tmp_path / "pulled", study=ds.StudyInstanceUID, log=lines.append)
    assert len(paths) == 1 and paths[0].name == f"{uid_key(ds.SOPInstanceUID, 'i_')}.dcm"
    np.testing.assert_array_equal(pydicom.dcmread(paths[0]).pixel_array, ds.pixel_array)
    assert pull(pacs, tmp_path / "pulled", study=ds.StudyInstanceUID, log=lines.append) == paths
    assert "(1 downloaded)" in lines[0] and "(0 downloaded)" in lines[1]
    everything = pull(pacs, tmp_path / "pulled")  # all studies, this one found on disk
    assert paths[0] in everything
    _assert_no_identifiers([str(p).encode() for p in (tmp_path / "pulled").rglob("*")], "pulled paths")
    _assert_no_identifiers([line.encode() for line in lines], "the log")


def test_cli_pull_and_watch(orthanc, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from medfm.cli.pacs import app

    ds = cxr_dicom(7)
    _pacs(orthanc).store([ds])
    user, password = orthanc.auth
    monkeypatch.setenv("MEDFM_PACS_USER", user)
    monkeypatch.setenv("MEDFM_PACS_PASSWORD", password)
    res = CliRunner().invoke(app, ["pull", orthanc.url, "--out", str(tmp_path / "out"),
                                   "--study", ds.StudyInstanceUID])
    assert res.exit_code == 0, res.output
    assert "1 instances in" in res.output
    _assert_no_identifiers([res.output.encode()], "the CLI output")
    # watch --once with the serving engine replaced by the stand-in model (the engine has its own tests)
    import medfm.serve.engine

    class Engine:
        analyse_dicom = staticmethod(_analyse)

    monkeypatch.setattr(medfm.serve.engine.Engine, "load", classmethod(lambda cls, runs: Engine()))
    res = CliRunner().invoke(app, ["watch", orthanc.url, str(tmp_path / "run"), "--state",
                                   str(tmp_path / "w"), "--once", "--no-overlay"])
    assert res.exit_code == 0, res.output
    assert "delivered" in res.output and "0 errors" in res.output
    assert {r["Modality"] for r in _pacs(orthanc).find_results(ds.StudyInstanceUID)} == {"SR", "SEG"}
    _assert_no_identifiers([res.output.encode()], "the CLI output")
    monkeypatch.setenv("MEDFM_PACS_PASSWORD", "wrong")
    res = CliRunner().invoke(app, ["pull", orthanc.url, "--out", str(tmp_path / "out")])
    assert isinstance(res.exception, PacsError)  # `medfm` prints it as one line, exit code 2


def test_errors_are_one_line(orthanc):
    from medfm.pacs.orthanc import free_port

    with pytest.raises(PacsError) as wrong:
        Pacs(orthanc.url, orthanc.user, "not-the-password").studies()
    assert "401" in str(wrong.value) and "\n" not in str(wrong.value)
    assert wrong.value.__cause__ is None and wrong.value.__suppress_context__
    with pytest.raises(PacsError) as down:
        Pacs(f"http://127.0.0.1:{free_port()}/dicom-web", timeout=2).studies()
    assert "not reachable" in str(down.value) and "\n" not in str(down.value)
    with pytest.raises(PacsError) as creds:  # credentials in the URL are used, never shown
        Pacs(orthanc.url.replace("http://", "http://medfm:secret-pw@")).studies()
    assert "secret-pw" not in str(creds.value) and "401" in str(creds.value)
