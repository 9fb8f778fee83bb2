"""DICOM reading: the real TCIA MR series and synthetic files for each pixel-encoding case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, RLELossless, generate_uid

from badinputs import jpeg_bytes, make_dicom
from medfm.data.read import list_series, probe, read, read_any, read_series
from medfm.errors import InputError

SERIES = "volumes_3d/dicom_series_vs_seg_001"


@pytest.fixture(scope="module")
def real_series(data_dir: Path):
    folder = data_dir / SERIES
    if not folder.is_dir():
        pytest.skip("DICOM series not present")
    return folder, read_any(folder)


def test_real_series_geometry(real_series) -> None:
    folder, s = real_series
    files = sorted(folder.glob("*.dcm"))
    assert s.array.shape == (1, 32, 512, 512) and len(files) == 32
    assert s.array.dtype == np.uint16  # MR without rescale keeps raw stored values
    hdrs = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.array(hdrs[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.dot(normal, np.array(h.ImagePositionPatient, dtype=float)) for h in hdrs])
    order = np.argsort(pos)
    diffs = np.diff(pos[order])
    assert s.spacing[0] == pytest.approx(float(np.median(diffs)))
    assert np.allclose(diffs, s.spacing[0], atol=1e-3)
    assert s.spacing[1:] == pytest.approx(tuple(float(v) for v in hdrs[0].PixelSpacing))
    assert s.orientation == "LPS"  # axial, head-first supine: columns -> left, rows -> posterior
    # slices are stacked by position: check first and last against pydicom directly
    for k in (0, 31):
        ref = pydicom.dcmread(files[order[k]]).pixel_array
        assert np.array_equal(s.array[0, k], ref)
    assert s.meta["modality"] == "MR" and s.meta["slices"] == 32
    assert s.meta["window"]["width"] > 0 and "windowed" not in s.meta
    aff = np.array(s.meta["affine"])
    assert aff[2, 3] == pytest.approx(pos[order[0]])  # z origin is the first slice position (axial)


def test_real_series_probe_matches_read(real_series) -> None:
    folder, s = real_series
    info = probe(folder)
    assert info["shape"] == s.array.shape
    assert info["spacing"] == pytest.approx(s.spacing)


def test_real_single_slice_and_window(data_dir: Path) -> None:
    f = sorted((data_dir / SERIES).glob("*.dcm"))[0]
    raw = read(f)
    assert raw.array.shape == (1, 512, 512)
    ds = pydicom.dcmread(f)
    assert np.array_equal(raw.array[0], ds.pixel_array)
    win = read(f, window=True)
    assert win.array.dtype == np.float32 and 0.0 <= win.array.min() and win.array.max() <= 1.0
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    # voxels well above the window are white, well below black
    assert np.all(win.array[raw.array > c + w / 2 + 1] == 1.0)
    assert np.all(win.array[raw.array < c - w / 2 - 1] == 0.0)


def test_rescale_gives_float_modality_values(tmp_path: Path) -> None:
    a = (np.arange(16 * 16).reshape(16, 16) * 10).astype(np.uint16)
    s = read(make_dicom(tmp_path / "ct.dcm", a, slope=2.0, intercept=-1024.0, window=(40, 400)))
    assert s.array.dtype == np.float32
    assert np.allclose(s.array[0], a * 2.0 - 1024.0)
    assert s.meta["rescaled"] and s.meta["window"] == {"center": 40.0, "width": 400.0, "function": "LINEAR"}
    assert s.spacing == (0.5, 0.7)


def test_window_linear_formula(tmp_path: Path) -> None:
    a = np.arange(0, 400, dtype=np.uint16).reshape(20, 20)
    s = read(make_dicom(tmp_path / "w.dcm", a, window=(200, 101)), window=True)
    y = s.array[0]
    assert y[a <= 149].max() == 0.0 and y[a >= 251].min() == 1.0
    mid = y[(a > 150) & (a < 250)]
    assert np.all(np.diff(mid) >= 0) and 0.0 < mid.mean() < 1.0
    assert s.array[0][a == 200][0] == pytest.approx(0.505, abs=0.01)


def test_monochrome1_inverted(tmp_path: Path) -> None:
    a = (np.arange(16 * 16).reshape(16, 16) * 10).astype(np.uint16)
    p = make_dicom(tmp_path / "m1.dcm", a, photometric="MONOCHROME1", bits_stored=12, window=(1000, 500))
    s = read(p)
    assert s.meta["inverted"]
    assert np.array_equal(s.array[0].astype(int), 4095 - a.astype(int))  # higher = brighter
    assert s.meta["window"]["center"] == pytest.approx(4095 - 1000)  # window moved with the values
    w = read(tmp_path / "m1.dcm", window=True).array[0]
    assert w[a < 700].min() == 1.0 and w[a > 1300].max() == 0.0  # low stored values display white


def test_multiframe_is_volume(tmp_path: Path) -> None:
    a = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    mf = np.stack([a, a + 1, a + 2])
    s = read(make_dicom(tmp_path / "mf.dcm", mf, SpacingBetweenSlices=2.5))
    assert s.array.shape == (1, 3, 16, 16)
    assert np.array_equal(s.array[0], mf)
    assert s.spacing == (2.5, 0.5, 0.7)


def test_rgb_and_signed(tmp_path: Path) -> None:
    rgb = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    s = read(make_dicom(tmp_path / "rgb.dcm", rgb))
    assert s.array.shape == (3, 16, 16) and np.array_equal(s.array.transpose(1, 2, 0), rgb)
    a = np.arange(256, dtype=np.int16).reshape(16, 16) - 500
    s = read(make_dicom(tmp_path / "s.dcm", a, signed=True))
    assert s.array.dtype == np.int16 and np.array_equal(s.array[0], a)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_lossless_compressed_syntaxes(tmp_path: Path, syntax) -> None:
    a = (np.arange(64 * 64).reshape(64, 64) % 3000).astype(np.uint16)
    p = make_dicom(tmp_path / "c.dcm", a)
    ds = pydicom.dcmread(p)
    ds.compress(syntax)
    ds.save_as(p)
    s = read(p)
    assert s.meta["transfer_syntax"] == syntax.name
    assert np.array_equal(s.array[0], a)


def test_jpeg_baseline_via_pylibjpeg_or_pillow(tmp_path: Path) -> None:
    g = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    p = make_dicom(tmp_path / "j.dcm", g)
    ds = pydicom.dcmread(p)
    ds.PixelData = encapsulate([jpeg_bytes(g)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(p)
    s = read(p)
    assert s.array.shape == (1, 32, 32) and s.meta["transfer_syntax"].startswith("JPEG Baseline")
    assert np.abs(s.array[0].astype(int) - g).mean() < 3  # lossy, but close


def _series(folder: Path, positions: list[float], uid: str, value0: int = 0) -> None:
    folder.mkdir(exist_ok=True)
    a = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    rng = np.random.default_rng(1)
    for k in rng.permutation(len(positions)):  # write in shuffled order, misleading instance numbers
        make_dicom(folder / f"s{k:02d}_{value0}.dcm", a + value0 + k, position=(0, 0, positions[k]),
                   series_uid=uid, instance=100 - k, modality="MR")


def test_series_sorted_by_position_not_instance(tmp_path: Path) -> None:
    _series(tmp_path / "s", [10.0, 12.5, 15.0, 17.5, 20.0], generate_uid())
    s = read_series(tmp_path / "s")
    assert s.array.shape == (1, 5, 16, 16)
    assert [int(s.array[0, i, 0, 0]) for i in range(5)] == [0, 1, 2, 3, 4]
    assert s.spacing == (2.5, 0.5, 0.7) and s.orientation == "LPS"
    assert "missing_slices" not in s.meta and "duplicate_slices" not in s.meta
    c = read_series(tmp_path / "s", canonical=True)
    assert c.orientation == "RAS" and c.spacing == pytest.approx((2.5, 0.5, 0.7))
    assert np.array_equal(c.array[0], s.array[0][:, ::-1, ::-1])  # LPS -> RAS flips x and y


def test_series_missing_and_duplicate_slices_reported(tmp_path: Path) -> None:
    uid = generate_uid()
    _series(tmp_path / "s", [0.0, 2.0, 4.0, 8.0, 10.0], uid)  # 6.0 missing
    s = read_series(tmp_path / "s")
    assert s.meta["missing_slices"] == 1 and s.spacing[0] == 2.0
    make_dicom(tmp_path / "s" / "dup.dcm", np.zeros((16, 16), np.uint16), position=(0, 0, 4.0),
               series_uid=uid, modality="MR")
    s = read_series(tmp_path / "s")
    assert s.meta["duplicate_slices"] == 1 and s.array.shape[1] == 5
    assert any("dropped" in w for w in s.meta["warnings"])


def test_mixed_series_largest_or_chosen(tmp_path: Path) -> None:
    big, small = generate_uid(), generate_uid()
    _series(tmp_path / "s", [0.0, 1.0, 2.0, 3.0], big)
    _series(tmp_path / "s", [0.0, 3.0], small, value0=1000)
    s = read_series(tmp_path / "s")
    assert s.array.shape[1] == 4 and s.meta["series_in_folder"] == 2
    listed = list_series(tmp_path / "s")
    assert [x["files"] for x in listed] == [4, 2] and listed[1]["series_uid"] == small
    s2 = read_series(tmp_path / "s", series_uid=small)
    assert s2.array.shape[1] == 2 and int(s2.array[0, 0, 0, 0]) >= 1000 and s2.spacing[0] == 3.0
    with pytest.raises(InputError, match="no series with the given series_uid"):
        read_series(tmp_path / "s", series_uid="1.2.3")


def test_series_slice_size_mismatch_names_file(tmp_path: Path) -> None:
    uid = generate_uid()
    _series(tmp_path / "s", [0.0, 1.0, 2.0], uid)
    make_dicom(tmp_path / "s" / "odd.dcm", np.zeros((8, 8), np.uint16), position=(0, 0, 3.0), series_uid=uid)
    with pytest.raises(InputError, match="odd.dcm.*differs"):
        read_series(tmp_path / "s")


def test_missing_codec_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compressed syntax whose plugin is not installed names the transfer syntax and what to install."""
    a = (np.arange(64 * 64).reshape(64, 64) % 3000).astype(np.uint16)
    p = make_dicom(tmp_path / "c.dcm", a)
    ds = pydicom.dcmread(p)
    ds.compress(RLELossless)
    ds.save_as(p)

    class NoPlugin:
        is_available = False
        missing_dependencies = ["pylibjpeg-rle - requires pylibjpeg>=2.0"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoPlugin())
    with pytest.raises(InputError, match="c.dcm: cannot decode transfer syntax 'RLE Lossless'.*pylibjpeg-rle"
                       ):
        read(p)


def test_dicom_without_preamble(tmp_path: Path) -> None:
    """Old archives hold bare datasets (no 128-byte preamble / DICM marker): still read as DICOM."""
    a = np.arange(64, dtype=np.uint16).reshape(8, 8)
    p = make_dicom(tmp_path / "full.dcm", a)
    ds = pydicom.dcmread(p)
    del ds.file_meta
    raw = tmp_path / "IM0001"
    ds.save_as(raw, implicit_vr=True, little_endian=True, enforce_file_format=False)
    s = read(raw)
    assert s.meta["format"] == "dicom" and np.array_equal(s.array[0], a)
