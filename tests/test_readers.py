"""Readers for PNG/JPEG, NIfTI and NPZ on real data and small synthetic files; dispatch and probe."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from badinputs import jpeg_bytes, write_png
from medfm.data.read import OPTIONS, probe, read, read_any, read_medmnist_npz
from medfm.data.readers import READERS
from medfm.errors import ConfigError, InputError

NIFTI = "volumes_3d/nifti"


# ---- real data ------------------------------------------------------------------------------------------


def test_real_cxr_png_and_mask(data_dir: Path) -> None:
    img = read(data_dir / "cxr_lung_seg/images/CHNCXR_0001_0.png")
    mask = read(data_dir / "cxr_lung_seg/masks/CHNCXR_0001_0.png")
    assert img.array.shape == (1, 256, 256) and img.array.dtype == np.uint8
    assert img.meta["bit_depth"] == 8 and img.orientation is None and img.spacing == (1.0, 1.0)
    assert mask.array.shape == img.array.shape
    assert set(np.unique(mask.array)) <= {0, 255}  # binarised masks per SOURCE.txt
    with Image.open(data_dir / "cxr_lung_seg/images/CHNCXR_0001_0.png") as im:
        assert np.array_equal(img.array[0], np.asarray(im))


def test_real_covid_cxr_sizes(data_dir: Path) -> None:
    files = sorted((data_dir / "covid_cxr_notes/images").iterdir())[:5]
    for f in files:
        s = read(f)
        with Image.open(f) as im:
            w, h = im.size
        assert s.array.shape == (1, h, w) and max(h, w) <= 512
        assert probe(f)["shape"] == s.array.shape


@pytest.mark.parametrize("name", ["FLAIR", "lesion", "chris_t1", "strokez"])
def test_real_nifti_matches_nibabel(data_dir: Path, name: str) -> None:
    p = data_dir / NIFTI / f"{name}.nii.gz"
    s = read(p)
    img = nib.as_closest_canonical(nib.load(p))
    x, y, z = img.shape[:3]
    assert s.array.shape == (1, z, y, x)
    zx, zy, zz = img.header.get_zooms()[:3]
    assert s.spacing == pytest.approx((zz, zy, zx))
    assert s.orientation == "RAS"
    ref = np.asanyarray(img.dataobj)
    assert s.array[0, 3, 5, 7] == pytest.approx(float(ref[7, 5, 3]))  # (C, z, y, x) = transposed (x, y, z)
    info = probe(p)  # header only, before reorientation: same axes lengths, possibly permuted
    assert info["shape"][0] == 1 and sorted(info["shape"][1:]) == sorted(s.array.shape[1:])


def test_real_flair_lesion_pair(data_dir: Path) -> None:
    flair = read(data_dir / NIFTI / "FLAIR.nii.gz")
    lesion = read(data_dir / NIFTI / "lesion.nii.gz")
    assert flair.array.shape == lesion.array.shape == (1, 140, 160, 124)
    assert np.issubdtype(lesion.array.dtype, np.integer)  # label maps keep integer dtype
    assert set(np.unique(lesion.array).tolist()) <= {0, 1, 2, 3} and lesion.array.max() > 0
    assert flair.spacing == lesion.spacing == (1.0, 1.0, 1.0)


def test_real_nifti_reoriented_from_las(data_dir: Path) -> None:
    s = read(data_dir / NIFTI / "strokez.nii.gz")
    assert s.meta["orig_orientation"] != "RAS" and s.orientation == "RAS"
    raw = read(data_dir / NIFTI / "strokez.nii.gz", canonical=False)
    assert raw.orientation == s.meta["orig_orientation"]
    assert np.array_equal(raw.array[..., ::-1], s.array)  # LAS -> RAS flips x only


def test_real_breastmnist_splits(data_dir: Path) -> None:
    d = read_medmnist_npz(data_dir / "medmnist/breastmnist.npz")
    assert {k: len(v[0]) for k, v in d.items()} == {"train": 546, "val": 78, "test": 156}
    imgs, labels = d["train"]
    assert imgs.shape == (546, 1, 28, 28) and imgs.dtype == np.uint8
    assert labels.shape == (546, 1) and set(np.unique(labels)) == {0, 1}
    assert int((labels == 0).sum()) == 147  # malignant count per SOURCE.txt
    raw = read_medmnist_npz(data_dir / "medmnist/breastmnist.npz", splits=("val",), channel_first=False)
    assert list(raw) == ["val"] and raw["val"][0].shape == (78, 28, 28)
    one = read(data_dir / "medmnist/breastmnist.npz", split="test", index=5)
    assert np.array_equal(one.array, d["test"][0][5]) and one.meta["label"] == d["test"][1][5].tolist()
    info = probe(data_dir / "medmnist/breastmnist.npz")
    assert info["splits"] == {"train": 546, "val": 78, "test": 156}


# ---- synthetic pictures --------------------------------------------------------------------------------


def test_png_16bit_kept(tmp_path: Path) -> None:
    a = (np.arange(64 * 64).reshape(64, 64) * 13).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "x16.png")
    s = read(tmp_path / "x16.png")
    assert s.array.dtype == np.uint16 and s.meta["bit_depth"] == 16
    assert np.array_equal(s.array[0], a)


def test_rgb_alpha_palette_grey(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgba = (rng.random((8, 10, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    s = read(tmp_path / "rgba.png")
    assert s.array.shape == (3, 8, 10) and np.array_equal(s.array.transpose(1, 2, 0), rgba[..., :3])
    g = read(tmp_path / "rgba.png", grey=True)
    assert g.array.shape == (1, 8, 10) and g.meta["converted_to_grey"]
    expect = np.asarray(Image.fromarray(rgba[..., :3]).convert("L"))
    assert np.array_equal(g.array[0], expect)
    # palette label map: colours by default, indices on request
    idx = (np.arange(80).reshape(8, 10) % 3).astype(np.uint8)
    pim = Image.fromarray(idx, "P")
    pim.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pim.save(tmp_path / "pal.png")
    s = read(tmp_path / "pal.png")
    assert s.array.shape == (3, 8, 10) and s.array[0][idx == 1].min() == 255
    assert np.array_equal(read(tmp_path / "pal.png", palette_index=True).array[0], idx)
    # LA (grey + alpha) -> one channel
    Image.fromarray(rgba[..., :2].copy(), "LA").save(tmp_path / "la.png")
    assert read(tmp_path / "la.png").array.shape == (1, 8, 10)


def test_jpeg_grey_and_rgb(tmp_path: Path) -> None:
    g = np.tile(np.linspace(0, 255, 24, dtype=np.uint8), (16, 1))
    (tmp_path / "g.jpg").write_bytes(jpeg_bytes(g))
    s = read(tmp_path / "g.jpg")
    assert s.array.shape == (1, 16, 24) and s.meta["format"] == "jpeg"
    assert np.abs(s.array[0].astype(int) - g).mean() < 3
    rgb = np.stack([g, g[::-1], 255 - g], -1)
    (tmp_path / "c.jpeg").write_bytes(jpeg_bytes(rgb))
    assert read(tmp_path / "c.jpeg").array.shape == (3, 16, 24)


def test_content_wins_over_extension(tmp_path: Path) -> None:
    p = write_png(tmp_path / "img.png", np.zeros((4, 4), np.uint8))
    q = tmp_path / "scan.nii"
    q.write_bytes(p.read_bytes())
    s = read(q)
    assert s.meta["format"] == "png" and "content is PNG" in s.meta["note_extension"]
    assert "note_extension" not in read(p).meta


# ---- NIfTI / NPZ synthetic -----------------------------------------------------------------------------


def test_nifti_4d_to_channels_and_nan_policy(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((5, 6, 7, 2)).astype(np.float32)
    aff = np.diag([0.5, 0.75, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "v.nii.gz")
    s = read(tmp_path / "v.nii.gz")
    assert s.array.shape == (2, 7, 6, 5) and s.spacing == (2.0, 0.75, 0.5)
    assert np.allclose(s.array[1], data[..., 1].transpose(2, 1, 0))
    data[1, 1, 1, 0] = np.nan
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "n.nii")
    with pytest.raises(InputError, match="NaN"):
        read(tmp_path / "n.nii")
    z = read(tmp_path / "n.nii", nan_policy="zero")
    assert z.array[0, 1, 1, 1] == 0.0 and z.meta["nonfinite_replaced"] == 1


def test_npz_single_image_layouts(tmp_path: Path) -> None:
    hwc = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", image=hwc, spacing=np.array([0.2, 0.3]))
    s = read(tmp_path / "a.npz")
    assert s.array.shape == (3, 20, 30) and s.spacing == (0.2, 0.3) and s.meta["layout"] == "hwc"
    vol = np.zeros((6, 20, 30), np.int16)
    np.save(tmp_path / "v.npy", vol)
    v = read(tmp_path / "v.npy")
    assert v.array.shape == (1, 6, 20, 30) and v.meta["format"] == "npy"
    assert read(tmp_path / "v.npy", layout="chw").array.shape == (6, 20, 30)
    assert probe(tmp_path / "v.npy")["shape"] == (6, 20, 30)


def test_medmnist_rgb_and_3d_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", train_images=rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8),
             train_labels=np.arange(4).reshape(4, 1))
    d = read_medmnist_npz(tmp_path / "rgb.npz")
    assert d["train"][0].shape == (4, 3, 64, 64)
    np.savez(tmp_path / "vol.npz", test_images=rng.integers(0, 255, (2, 28, 28, 28), dtype=np.uint8),
             test_labels=np.array([0, 1]))
    d = read_medmnist_npz(tmp_path / "vol.npz")
    assert d["test"][0].shape == (2, 1, 28, 28, 28) and d["test"][1].shape == (2, 1)
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((3, 8, 8)), train_labels=np.zeros(2))
    with pytest.raises(InputError, match="3 images but 'train_labels' has 2"):
        read_medmnist_npz(tmp_path / "bad.npz")


# ---- dispatch ------------------------------------------------------------------------------------------


def test_registry_options_and_folder(tmp_path: Path) -> None:
    assert {"image", "dicom", "dicom_series", "nifti", "npz"} <= set(READERS.names())
    p = write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ConfigError, match="unknown read option"):
        read(p, windw=True)
    assert "max_voxels" in OPTIONS
    with pytest.raises(InputError, match="max_voxels"):
        read(p, max_voxels=10)
    with pytest.raises(InputError, match="is a folder"):
        read(tmp_path)
    with pytest.raises(InputError, match="no DICOM files"):
        read_any(tmp_path)
    with pytest.raises(InputError, match="file not found"):
        read(tmp_path / "nope.png")
