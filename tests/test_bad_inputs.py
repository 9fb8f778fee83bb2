"""Every broken file gives a one-line InputError naming the file and the problem, never a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from badinputs import make_bad_corpus, make_scan_corpus, write_png
from medfm.data.read import probe, read, read_any
from medfm.errors import InputError

# corpus name -> phrase the error must contain
EXPECTED = {
    "zero_byte_png": "empty file",
    "truncated_png": "truncated",
    "truncated_dicom": "truncated",
    "dicom_no_pixels": "no pixel data",
    "text_as_png": "not a PNG file: content is a text file",
    "nan_nifti": "NaN",
    "inf_nifti": "Inf",
    "truncated_nifti": "truncated",
    "bomb_png": "decompression bomb",
    "bomb_nifti": "decompression bomb",
    "not_image_txt": "not a supported image format",
    "not_image_csv": "not a supported image format",
    "pickle_npz": "refusing to unpickle",
    "dicom_undecodable": "cannot decode transfer syntax 'MPEG2",
    # issue 16
    "nifti_zero_affine": "NIfTI affine (sform/qform) is all zeros: orientation and voxel spacing unknown",
    "nifti_singular_affine": "NIfTI affine (sform/qform) is singular",
    "npy_pickle": "array holds Python objects; refusing to unpickle",
    "npz_truncated": "truncated or corrupt .npz archive",
    "medmnist_archive": "is a MedMNIST archive: pass split= and index=",
    "npz_ambiguous": "cannot tell which array is the image among ['first', 'second']",
    "npz_strings": "array dtype <U1 is not numeric",
    "npy_5d": "array of shape (2, 2, 2, 2, 2) is not an image",
    "nan_npz": "contains 1 NaN and 0 Inf voxels",
    "gzip_not_nifti": "not a NIFTI file: content is gzip data that is not NIfTI",
    "pdf_as_dcm": "not a DICOM file: content is a PDF document",
    "garbage_dcm": "not a DICOM file: content is unrecognised binary data",
    "dicom_zero_rows": "DICOM header has invalid image size Rows=0",
    "bomb_dicom": "200 x 60000 x 60000 x 1 = 720000000000 voxels, over the limit",
    "truncated_jpeg": "truncated or corrupt image data",
    "folder_as_file": "is a folder; use read_any() or read_series()",
}
# Read fine; the note says exactly what was wrong (name -> (meta key, text)).
READS_WITH_NOTE = {
    "jpeg_as_dcm": ("note_extension", "extension says DICOM but content is JPEG; read as jpeg"),
    "png_as_jpg": ("note_extension", "extension says JPEG but content is PNG; read as png"),
    "dicom_negative_spacing": ("note_spacing", "PixelSpacing -0.5 is not positive; spacing set to 1.0"),
    "dicom_zero_spacing": ("note_spacing", "PixelSpacing 0 is not positive; spacing set to 1.0"),
}
# Found while scanning a folder: never a case, always a skipped entry with this reason.
SCAN_SKIPPED = {
    "scan_pickle_npz": "array 'image' holds pickled Python objects; refused (unpickling untrusted data could "
                       "execute code)",
    "scan_link_loop": "symbolic link loop (the link points back to itself); skipped",
    "scan_broken_link": "broken symbolic link (its target does not exist); skipped",
    "scan_dir_loop": "symbolic link loop (points to a folder that contains it); not followed",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_bad_corpus(tmp_path_factory.mktemp("bad"))


def test_corpus_has_at_least_30_kinds(corpus: dict[str, Path]) -> None:
    """Issue 16 closing note: from 14 kinds (all refused by read) to at least 30, each asserted below."""
    kinds = set(EXPECTED) | set(READS_WITH_NOTE) | set(SCAN_SKIPPED) | {"series_duplicates"}
    assert len(EXPECTED) == 30 and len(kinds) == 39
    assert set(EXPECTED) | set(READS_WITH_NOTE) <= set(corpus)


@pytest.mark.parametrize("name", sorted(READS_WITH_NOTE))
def test_bad_header_reads_with_note(corpus: dict[str, Path], name: str) -> None:
    key, text = READS_WITH_NOTE[name]
    s = read(corpus[name])
    assert s.meta[key] == text
    if key == "note_spacing":
        assert s.spacing == (1.0, 1.0) and s.array.shape == (1, 16, 16)


@pytest.fixture(scope="module")
def scan_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_scan_corpus(tmp_path_factory.mktemp("scan"))


def test_folder_scan_lists_what_it_cannot_use(scan_corpus: dict[str, Path]) -> None:
    """Issue 16 item 8: pickled .npz, link loops and broken links are listed, never silently absent."""
    from medfm.data.importers import resolve_source

    m = resolve_source(scan_corpus["scan_root"])
    assert sorted(m.df["image"]) == sorted(str(scan_corpus[k]) for k in ("good_a", "good_b"))
    errors = [b["error"] for b in m.bad_rows]
    assert len(errors) == len(SCAN_SKIPPED)
    for name, why in SCAN_SKIPPED.items():
        assert f"{scan_corpus[name]}: {why}" in errors, name
    assert all("\n" not in e and len(e) < 400 for e in errors)


def test_prepare_folder_keeps_good_cases_and_reports_scan_skips(scan_corpus: dict[str, Path],
                                                                tmp_path: Path) -> None:
    from medfm.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(size=16, keep_identifiers=True, salt_file=str(tmp_path / "salt"))
    s = prepare(scan_corpus["scan_root"], tmp_path / "out", cfg, progress=False)
    assert s["n_cases"] == 2 and s["n_skipped"] == len(SCAN_SKIPPED)  # the job goes on
    errors = [r["error"] for r in s["skipped"]]
    for name, why in SCAN_SKIPPED.items():
        assert f"{scan_corpus[name]}: {why}" in errors, name


def test_series_with_colliding_positions_warns_with_count(scan_corpus: dict[str, Path]) -> None:
    s = read_any(scan_corpus["series_duplicates"])
    assert s.array.shape == (1, 4, 8, 8) and s.meta["duplicate_slices"] == 2
    assert s.meta["warnings"] == [
        "2 of 6 slices share a position with another slice (within 0.001 mm); duplicates dropped, the first "
        "file (by name) at each position kept"
    ]
    assert "s0" not in " ".join(s.meta["warnings"])  # a count, never a file name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_gives_one_line_input_error(corpus: dict[str, Path], name: str) -> None:
    path = corpus[name]
    with pytest.raises(InputError) as info:
        read(path)
    msg = str(info.value)
    assert path.name in msg and EXPECTED[name] in msg
    assert "\n" not in msg and len(msg) < 400
    assert info.value.path == str(path)


def test_wrong_extension_reads_with_note(corpus: dict[str, Path]) -> None:
    s = read(corpus["jpeg_as_dcm"])
    assert s.array.shape == (1, 32, 32) and s.meta["format"] == "jpeg"
    assert "extension says DICOM but content is JPEG" in s.meta["note_extension"]
    s = read(corpus["png_as_jpg"])
    assert s.meta["format"] == "png" and np.array_equal(s.array, read(corpus["good_image"]).array)


def test_nan_policy_zero_reads_nan_file(corpus: dict[str, Path]) -> None:
    s = read(corpus["nan_nifti"], nan_policy="zero")
    assert np.isfinite(s.array).all() and s.meta["nonfinite_replaced"] == 1


def test_probe_refuses_what_headers_show(corpus: dict[str, Path]) -> None:
    for name in ("zero_byte_png", "text_as_png", "bomb_png", "not_image_csv"):
        with pytest.raises(InputError, match=corpus[name].name):
            probe(corpus[name])
    assert probe(corpus["bomb_nifti"])["shape"] == (1, 4000, 4000, 4000)  # probe reports, read refuses
    note = probe(corpus["nifti_zero_affine"])["note_affine"]
    assert note == "affine is all zeros: read() will refuse this file"


def test_max_voxels_configurable(corpus: dict[str, Path], tmp_path: Path) -> None:
    big = np.zeros((300, 300), np.uint8)
    p = write_png(tmp_path / "big.png", big)
    with pytest.raises(InputError, match="90000 voxels, over the limit 1000"):
        read(p, max_voxels=1000)
    assert read(p, max_voxels=10**5).array.shape == (1, 300, 300)


def test_support_files_for_prepare(corpus: dict[str, Path]) -> None:
    assert read(corpus["mismatch_image"]).array.shape != read(corpus["mismatch_mask"]).array.shape

    miss = pd.read_csv(corpus["manifest_missing_file"])
    base = corpus["manifest_missing_file"].parent
    assert not all((base / f).is_file() for f in miss["image"])
    dup = pd.read_csv(corpus["manifest_duplicate_ids"])
    assert dup["case_id"].duplicated().any()
    bad = pd.read_csv(corpus["manifest_bad"])
    assert bad["case_id"].duplicated().any() and not all((base / f).is_file() for f in bad["image"])


def test_scan_skips_in_hashed_mode_keep_a_way_back(scan_corpus: dict[str, Path], tmp_path: Path) -> None:
    """Without --keep-identifiers a skipped scan file gets a hashed id that the private map resolves."""
    import json

    from medfm.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(size=16, salt_file=str(tmp_path / "secret" / "salt"))
    s = prepare(scan_corpus["scan_root"], tmp_path / "out", cfg, progress=False)
    back = json.loads(Path(s["case_map_file"]).read_text())["cases"]
    scan_skips = [r for r in s["skipped"] if r["error"].startswith("<image>: ")]
    assert len(scan_skips) == len(SCAN_SKIPPED)
    found = {back[r["case_id"]]["image"] for r in scan_skips}
    assert found == {str(scan_corpus[name]) for name in SCAN_SKIPPED}
    assert str(scan_corpus["scan_root"]) not in json.dumps(s["skipped"])
