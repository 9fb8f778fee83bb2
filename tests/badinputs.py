"""Builders for test inputs: small synthetic DICOMs and a corpus of broken files.

``make_bad_corpus(dir)`` writes every kind of bad input medfm must reject with a one-line InputError (plus a
few that must still read, e.g. a JPEG named .dcm) and returns {name: path}. Nothing is stored in the repo:
everything is generated in a tmp dir at test time. Other test modules import this file.

Fake identifiers in the synthetic DICOMs (FAKE_IDENTIFIERS) let tests prove none of them leaks into outputs.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

FAKE_IDENTIFIERS = {
    "PatientName": "Doe^Jane",
    "PatientID": "MRN-99417",
    "PatientBirthDate": "19510214",
    "AccessionNumber": "ACC-55821",
    "InstitutionName": "St Example Hospital",
    "ReferringPhysicianName": "House^Gregory",
    "StudyDate": "20190307",
    "StudyTime": "101530",
}


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    a = np.asarray(array)
    Image.fromarray(a if a.ndim == 2 else a.transpose(1, 2, 0) if a.shape[0] in (3, 4) else a).save(path)
    return Path(path)


def make_dicom(path: str | Path, array: np.ndarray, *, modality: str = "CT", photometric: str = "MONOCHROME2",
               slope: float | None = None, intercept: float | None = None,
               window: tuple[float, float] | None = None, spacing: tuple[float, float] = (0.5, 0.7),
               position: tuple[float, float, float] | None = None,
               orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), series_uid: str | None = None,
               instance: int = 1, signed: bool = False, bits_stored: int | None = None,
               identifiers: dict[str, str] | None = None, pixels: bool = True, **extra: Any) -> Path:
    """Write a small valid DICOM file (explicit VR little endian, with preamble) holding `array`.

    array: (H, W) grey, (F, H, W) multi-frame grey, or (H, W, 3) uint8 RGB.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
                 "CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}.get(
        modality, "1.2.840.10008.5.1.4.1.1.7")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = extra.pop("study_uid", None) or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.Manufacturer = "ACME"
    ds.PatientSex = "F"
    ds.PatientAge = "067Y"
    for k, v in (FAKE_IDENTIFIERS if identifiers is None else identifiers).items():
        setattr(ds, k, v)
    ds.InstanceNumber = instance
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    if slope is not None or intercept is not None:
        ds.RescaleSlope = slope if slope is not None else 1.0
        ds.RescaleIntercept = intercept if intercept is not None else 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for k, v in extra.items():
        setattr(ds, k, v)
    a = np.asarray(array)
    if pixels:
        if a.ndim == 3 and a.shape[-1] == 3:
            ds.set_pixel_data(a.astype(np.uint8), "RGB", 8)
        else:
            if signed:
                a = a.astype(np.int16)
            elif a.dtype not in (np.uint8, np.uint16):
                a = a.astype(np.uint16)
            ds.set_pixel_data(a, photometric, bits_stored or a.dtype.itemsize * 8)
            if a.ndim == 3:
                ds.NumberOfFrames = a.shape[0]
    else:
        ds.Rows, ds.Columns = a.shape[-2:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    _ = pydicom  # imported for side effects of pixel handlers
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A few-hundred-byte PNG whose header declares width x height grey pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_bad_corpus(directory: str | Path) -> dict[str, Path]:
    """Write the bad-input corpus into directory; returns {name: path}.

    Files that must raise InputError: zero_byte_png, truncated_png, truncated_dicom, dicom_no_pixels,
    text_as_png, nan_nifti, inf_nifti, truncated_nifti, bomb_png, bomb_nifti, not_image_txt, not_image_csv,
    pickle_npz, dicom_undecodable, nifti_zero_affine, nifti_singular_affine, npy_pickle, npz_truncated,
    medmnist_archive, npz_ambiguous, npz_strings, npy_5d, nan_npz, gzip_not_nifti, pdf_as_dcm, garbage_dcm,
    dicom_zero_rows, bomb_dicom, truncated_jpeg, folder_as_file.
    Files that must read fine (content wins, a note is recorded): jpeg_as_dcm, png_as_jpg,
    dicom_negative_spacing, dicom_zero_spacing (spacing falls back to 1.0 with a note saying why).
    Inputs for dataset preparation: mismatch_image + mismatch_mask (32x32 image, 16x16 mask), good_image,
    good_mask, manifest_missing_file (CSV listing an absent image), manifest_duplicate_ids (CSV with a
    repeated case_id), manifest_bad (both problems). Manifest columns: case_id,image,mask,label,patient_id,
    site,split with image/mask paths relative to the CSV's folder.
    """
    import nibabel as nib

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    img = (rng.random((32, 32)) * 255).astype(np.uint8)
    out: dict[str, Path] = {}

    out["zero_byte_png"] = d / "empty.png"
    out["zero_byte_png"].write_bytes(b"")

    good = write_png(d / "good_image.png", img)
    raw = good.read_bytes()
    out["truncated_png"] = d / "truncated.png"
    out["truncated_png"].write_bytes(raw[: len(raw) // 2])

    dcm = make_dicom(d / "full.dcm", (rng.random((64, 64)) * 4000).astype(np.uint16))
    out["truncated_dicom"] = d / "truncated.dcm"
    out["truncated_dicom"].write_bytes(dcm.read_bytes()[: dcm.stat().st_size - 4000])
    dcm.unlink()

    out["dicom_no_pixels"] = make_dicom(d / "no_pixels.dcm", np.zeros((8, 8), np.uint16), pixels=False)

    out["text_as_png"] = d / "notes.png"
    out["text_as_png"].write_text("Patient notes: no acute findings.\nThis is text, not an image.\n")

    out["jpeg_as_dcm"] = d / "photo_really_jpeg.dcm"
    out["jpeg_as_dcm"].write_bytes(jpeg_bytes(img))
    out["png_as_jpg"] = d / "really_png.jpg"
    out["png_as_jpg"].write_bytes(raw)

    vol = rng.random((8, 8, 8)).astype(np.float32)
    nan = vol.copy()
    nan[1, 2, 3] = np.nan
    out["nan_nifti"] = d / "nan_volume.nii.gz"
    nib.save(nib.Nifti1Image(nan, np.eye(4)), out["nan_nifti"])
    inf = vol.copy()
    inf[0, 0, 0] = np.inf
    out["inf_nifti"] = d / "inf_volume.nii"
    nib.save(nib.Nifti1Image(inf, np.eye(4)), out["inf_nifti"])
    full = d / "full.nii"
    nib.save(nib.Nifti1Image(rng.random((16, 16, 16)).astype(np.float32), np.eye(4)), full)
    out["truncated_nifti"] = d / "truncated_volume.nii"
    out["truncated_nifti"].write_bytes(full.read_bytes()[:2000])
    full.unlink()
    # header claims 4000^3 voxels; the file holds almost nothing
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4000, 4000, 4000))
    hdr.set_data_dtype(np.uint8)
    out["bomb_nifti"] = d / "bomb_volume.nii"
    out["bomb_nifti"].write_bytes(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 64)

    out["bomb_png"] = bomb_png(d / "bomb.png")

    out["not_image_txt"] = d / "readme.txt"
    out["not_image_txt"].write_text("just some text\n")
    out["not_image_csv"] = d / "table.csv"
    out["not_image_csv"].write_text("a,b\n1,2\n")

    out["pickle_npz"] = d / "objects.npz"
    np.savez(out["pickle_npz"], image=np.array([{"a": 1}, None], dtype=object))

    out["dicom_undecodable"] = _undecodable_dicom(d / "video.dcm")
    _more_bad_files(d, out, rng)

    # pairs and manifests for the dataset-preparation tests
    out["good_image"] = good
    out["good_mask"] = write_png(d / "good_mask.png", ((img > 128) * 255).astype(np.uint8))
    out["mismatch_image"] = write_png(d / "mismatch_image.png", img)
    out["mismatch_mask"] = write_png(d / "mismatch_mask.png", np.zeros((16, 16), np.uint8))
    header = "case_id,image,mask,label,patient_id,site,split\n"
    ok_rows = "".join(f"c{i},good_image.png,good_mask.png,{i % 2},p{i},A,train\n" for i in range(3))
    out["manifest_missing_file"] = d / "manifest_missing.csv"
    out["manifest_missing_file"].write_text(header + ok_rows + "c9,does_not_exist.png,,1,p9,A,test\n")
    out["manifest_duplicate_ids"] = d / "manifest_duplicates.csv"
    dup_row = "c1,good_image.png,good_mask.png,0,p7,B,val\n"
    out["manifest_duplicate_ids"].write_text(header + ok_rows + dup_row)
    out["manifest_bad"] = d / "manifest_bad.csv"
    out["manifest_bad"].write_text(header + ok_rows + "c9,does_not_exist.png,,1,p9,A,test\n"
                                   "c1,good_image.png,good_mask.png,0,p7,B,val\n")
    return out


def nifti_with_affine(path: Path, srow: list[list[float]], shape: tuple[int, ...] = (8, 8, 8)) -> Path:
    """An uncompressed NIfTI-1 whose sform rows are `srow` (qform unset): nibabel cannot write such files."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4))
    hdr = img.header
    hdr["qform_code"], hdr["sform_code"] = 0, 1
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = srow
    path.write_bytes(hdr.binaryblock + b"\x00" * 4 + np.ones(shape, "<f4").tobytes())
    return path


def _more_bad_files(d: Path, out: dict[str, Path], rng: np.random.Generator) -> None:
    """The kinds added for issue 16 (each one a file a new user met or could meet)."""
    import pydicom

    out["nifti_zero_affine"] = nifti_with_affine(d / "zero_affine.nii", [[0.0] * 4] * 3)
    out["nifti_singular_affine"] = nifti_with_affine(
        d / "singular_affine.nii", [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]]
    )
    out["npy_pickle"] = d / "objects.npy"
    np.save(out["npy_pickle"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(d / "whole.npz", image=rng.random((16, 16)))
    out["npz_truncated"] = d / "truncated.npz"
    out["npz_truncated"].write_bytes((d / "whole.npz").read_bytes()[:300])
    (d / "whole.npz").unlink()
    out["medmnist_archive"] = d / "tiny_medmnist.npz"
    np.savez(out["medmnist_archive"], train_images=np.zeros((2, 8, 8), np.uint8),
             train_labels=np.zeros((2, 1), np.uint8))
    out["npz_ambiguous"] = d / "two_arrays.npz"
    np.savez(out["npz_ambiguous"], first=np.zeros((8, 8)), second=np.ones((8, 8)))
    out["npz_strings"] = d / "strings.npz"
    np.savez(out["npz_strings"], image=np.array([["a", "b"], ["c", "d"]]))
    out["npy_5d"] = d / "five_d.npy"
    np.save(out["npy_5d"], np.zeros((2, 2, 2, 2, 2), np.float32))
    nan = rng.random((8, 8)).astype(np.float32)
    nan[3, 3] = np.nan
    out["nan_npz"] = d / "nan_image.npz"
    np.savez(out["nan_npz"], image=nan)
    out["gzip_not_nifti"] = d / "not_really.nii.gz"
    import gzip

    out["gzip_not_nifti"].write_bytes(gzip.compress(b"just compressed text, no NIfTI header\n" * 20))
    out["pdf_as_dcm"] = d / "report.dcm"
    out["pdf_as_dcm"].write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n")
    out["garbage_dcm"] = d / "garbage.dcm"
    out["garbage_dcm"].write_bytes(bytes(rng.integers(1, 256, 600, dtype=np.uint8)))
    zr = make_dicom(d / "zero_rows.dcm", np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(zr)
    ds.Rows = 0
    ds.save_as(zr, enforce_file_format=True)
    out["dicom_zero_rows"] = zr
    bomb = make_dicom(d / "bomb.dcm", np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(bomb)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 200
    ds.save_as(bomb, enforce_file_format=True)
    out["bomb_dicom"] = bomb
    jpg = jpeg_bytes((rng.random((64, 64)) * 255).astype(np.uint8))
    out["truncated_jpeg"] = d / "truncated.jpg"
    out["truncated_jpeg"].write_bytes(jpg[: len(jpg) // 3])
    out["folder_as_file"] = d / "a_folder.png"
    out["folder_as_file"].mkdir()
    # Read fine, with a note saying what was wrong in the header (the spacing falls back to 1.0).
    px = (rng.random((16, 16)) * 1000).astype(np.uint16)
    out["dicom_negative_spacing"] = make_dicom(d / "negative_spacing.dcm", px, spacing=(-0.5, 0.5))
    out["dicom_zero_spacing"] = make_dicom(d / "zero_spacing.dcm", px, spacing=(0.0, 0.0))


def make_scan_corpus(directory: str | Path) -> dict[str, Path]:
    """A folder for `medfm data prepare FOLDER` with files a scan must list as skipped, plus good images.

    Returns {name: path}: scan_root (the folder to scan), good_a, good_b (PNGs in it that must be kept),
    scan_pickle_npz (object array),
    scan_link_loop (a file link pointing to itself), scan_broken_link (its target is missing),
    scan_dir_loop (a folder link to its own parent) and series_duplicates (a DICOM series in which
    2 of 6 slices repeat a position; beside scan_root, not in it). Kept apart from make_bad_corpus: links
    and loops would change what a scan of that folder finds.
    """
    base = Path(directory)
    d = base / "folder"
    (d / "sub").mkdir(parents=True, exist_ok=True)
    img = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    out = {"scan_root": d, "good_a": write_png(d / "good_a.png", img),
           "good_b": write_png(d / "sub" / "good_b.png", img.T)}
    out["scan_pickle_npz"] = d / "pickled.npz"
    np.savez(out["scan_pickle_npz"], image=np.array([{"a": 1}, None], dtype=object))
    out["scan_link_loop"] = d / "loop.png"
    out["scan_link_loop"].symlink_to("loop.png")
    out["scan_broken_link"] = d / "broken.png"
    out["scan_broken_link"].symlink_to(d / "gone" / "missing.png")
    out["scan_dir_loop"] = d / "sub" / "up"
    out["scan_dir_loop"].symlink_to("..", target_is_directory=True)
    series = base / "series"  # beside the folder: a volume would make the folder a 2D/3D mix
    series.mkdir()
    z = [0.0, 2.0, 2.0, 4.0, 6.0, 6.0]
    uid = "1.2.826.0.1.3680043.8.498.1"
    for k, pos in enumerate(z):
        make_dicom(series / f"s{k:02d}.dcm", np.full((8, 8), 100 * k, np.uint16), series_uid=uid,
                   position=(0.0, 0.0, pos), instance=k + 1, slope=1.0, intercept=-1024.0)
    out["series_duplicates"] = series
    return out


def _undecodable_dicom(path: Path) -> Path:
    """A DICOM whose pixel data is in a transfer syntax pydicom cannot decode (MPEG-2 video)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    p = make_dicom(path, np.zeros((16, 16), np.uint8))
    import pydicom

    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    ds.save_as(p, enforce_file_format=True)
    return p
