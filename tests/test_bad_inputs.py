"""Every broken file gives a one-line InputError naming the file and the problem, never a traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from badinputs import make_bad_corpus, write_png
from medfm.data.read import probe, read
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
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_bad_corpus(tmp_path_factory.mktemp("bad"))


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
