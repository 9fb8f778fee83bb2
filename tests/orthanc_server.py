"""A real Orthanc for PACS tests, and chest X-ray DICOMs made from the real data (cxr_lung_seg).

Use from a test module: ``orthanc = pytest.fixture(scope="module")(orthanc_fixture)``, or call
:func:`running_orthanc` for a server of one's own. Without Orthanc installed the tests skip on a developer
machine and fail in CI (CI=true/1), like missing real data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

FAKE_PATIENT = {
    "PatientName": "Test^Patient",
    "PatientID": "P-TEST-001",
    "PatientBirthDate": "19580412",
    "AccessionNumber": "ACC-TEST-7731",
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(reason: str) -> NoReturn:
    if _in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def running_orthanc() -> Iterator:  # yields medfm.pacs.Orthanc
    """A started Orthanc in a temporary folder; stopped and removed afterwards."""
    from medfm.pacs.orthanc import Orthanc, OrthancNotFound

    try:
        server = Orthanc()
    except OrthancNotFound as e:
        _missing(str(e))
    with server:
        yield server


def orthanc_fixture() -> Iterator:
    yield from running_orthanc()


def cxr_dir() -> Path:
    root = Path(os.environ.get("MEDFM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    cxr = root / "cxr_lung_seg"
    if not (cxr / "manifest.csv").is_file():
        _missing(f"real data missing at {cxr} (set MEDFM_DATA)")
    return cxr


def cxr_image(index: int = 0) -> np.ndarray:
    """Row `index` of the cxr_lung_seg manifest as a (H, W) uint8 grey image."""
    import pandas as pd
    from PIL import Image

    cxr = cxr_dir()
    row = pd.read_csv(cxr / "manifest.csv").iloc[index]
    return np.asarray(Image.open(cxr / row["image"]).convert("L"))


def dx_dataset(pixels: np.ndarray, bits_stored: int, study_uid: str | None = None, instance: int = 1,
               date: str = "20240301", sex: str = "M"):  # noqa: ANN201 - Dataset
    """A DX "for presentation" instance of a grey image (uint8 for 8 bits, else uint16) with the fake
    patient and fresh UIDs."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for k, v in FAKE_PATIENT.items():
        setattr(ds, k, v)
    ds.PatientSex = sex
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.ReferringPhysicianName = date, "101500", "1", ""
    ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "DX", "ACME", "CHEST"
    ds.SeriesNumber, ds.InstanceNumber = 1, instance
    ds.PresentationIntentType, ds.PatientOrientation = "FOR PRESENTATION", ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    allocated = 8 if bits_stored <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint8 if allocated == 8 else np.uint16).tobytes()
    return ds


def cxr_dicom(index: int = 0, study_uid: str | None = None, instance: int = 1):  # noqa: ANN201 - Dataset
    """A DX "for presentation" instance (12 bit in 16) of a real chest X-ray with a fake patient."""
    pixels = cxr_image(index).astype(np.uint16) * 16  # 8-bit PNG -> 12-bit detector range
    ds = dx_dataset(pixels, 12, study_uid, instance)
    ds.ImagerPixelSpacing = ds.PixelSpacing = [0.5, 0.5]
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
    return ds
