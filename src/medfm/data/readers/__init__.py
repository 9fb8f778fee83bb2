"""One reader per format, in a registry: ``READERS.create("dicom", path=..., **opts) -> Sample``.

Readers are imported lazily (pydicom, nibabel and Pillow load only when a file of their kind is read).
Use :func:`medfm.data.read.read` to dispatch on file content; use a reader directly to force a format.
"""

from __future__ import annotations

from typing import Any

from medfm.data.sample import Sample
from medfm.registry import Registry

READERS: Registry[Sample] = Registry("reader")
PROBES: Registry[dict[str, Any]] = Registry("probe")


@READERS.register("image", help="PNG / JPEG / TIFF / BMP through Pillow (8 or 16 bit, grey or RGB)")
def _image(path: Any, **opts: Any) -> Sample:
    from medfm.data.readers.image import read_image

    return read_image(path, **opts)


@READERS.register("dicom", help="one DICOM file (2D or multi-frame)")
def _dicom(path: Any, **opts: Any) -> Sample:
    from medfm.data.readers.dicom import read_dicom

    return read_dicom(path, **opts)


@READERS.register("dicom_series", help="a folder holding a DICOM series")
def _dicom_series(path: Any, **opts: Any) -> Sample:
    from medfm.data.readers.dicom_series import read_series

    return read_series(path, **opts)


@READERS.register("nifti", help="NIfTI-1/2 volume (.nii, .nii.gz), reoriented to RAS")
def _nifti(path: Any, **opts: Any) -> Sample:
    from medfm.data.readers.nifti import read_nifti

    return read_nifti(path, **opts)


@READERS.register("npz", help="one image from an .npz / .npy file (or split+index of a MedMNIST archive)")
def _npz(path: Any, **opts: Any) -> Sample:
    from medfm.data.readers.npz import read_npz

    return read_npz(path, **opts)


@PROBES.register("image")
def _probe_image(path: Any, **opts: Any) -> dict[str, Any]:
    from medfm.data.readers.image import probe_image

    return probe_image(path, max_voxels=opts.get("max_voxels"))


@PROBES.register("dicom")
def _probe_dicom(path: Any, **opts: Any) -> dict[str, Any]:
    from medfm.data.readers.dicom import probe_dicom

    return probe_dicom(path)


@PROBES.register("nifti")
def _probe_nifti(path: Any, **opts: Any) -> dict[str, Any]:
    from medfm.data.readers.nifti import probe_nifti

    return probe_nifti(path)


@PROBES.register("npz")
def _probe_npz(path: Any, **opts: Any) -> dict[str, Any]:
    from medfm.data.readers.npz import probe_npz

    return probe_npz(path)


# content format (from medfm.data.readers.common.sniff) -> reader name
FORMAT_READER = {
    "png": "image",
    "jpeg": "image",
    "tiff": "image",
    "bmp": "image",
    "dicom": "dicom",
    "nifti": "nifti",
    "npz": "npz",
    "npy": "npz",
}

__all__ = ["FORMAT_READER", "PROBES", "READERS"]
