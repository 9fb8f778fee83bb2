"""Reading a manifest image reference: a file, a DICOM series folder, or ``file.npz::key/i`` -> Sample."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from medfm.data.manifest import NPZ_REF
from medfm.errors import InputError


@lru_cache(maxsize=4)
def _npz_array(path: str, key: str) -> np.ndarray:
    with np.load(path) as z:
        return z[key]


def read_ref(ref: str) -> Any:
    """Read a manifest image reference: a file, a DICOM series folder, or ``file.npz::key/i`` -> Sample."""
    from medfm.data.sample import Sample

    file_part, sep, key = ref.partition(NPZ_REF)
    if sep and key.startswith("series/"):  # the k-th series (UID order) of a folder with several
        from medfm.data.read import read_series
        from medfm.data.readers.dicom_series import list_series

        uids = sorted(d["series_uid"] for d in list_series(file_part) if d["files"] > 1)
        k = int(key.split("/", 1)[1])
        if k >= len(uids):
            raise InputError(file_part, f"series {k} not found (folder has {len(uids)} multi-file series)")
        return read_series(file_part, series_uid=uids[k])
    if sep:
        name, _, idx = key.rpartition("/")
        arr = _npz_array(file_part, name)
        try:
            a = np.asarray(arr[int(idx)])
        except (IndexError, ValueError) as e:
            raise InputError(ref, f"no item {idx} in array {name}") from e
        # MedMNIST: (H, W), (H, W, 3) or (D, H, W) for the *3d subsets.
        if a.ndim == 3 and a.shape[-1] in (3, 4):  # (H, W, RGB); a volume never has 3 columns
            a = np.moveaxis(a, -1, 0)
        else:
            a = a[None]
        return Sample(array=a, spacing=(1.0,) * (a.ndim - 1), path=ref, meta={"format": "npz"})
    p = Path(ref)
    try:
        from medfm.data.read import read, read_series
    except ImportError:  # readers still being written: minimal fallback for pictures and NIfTI
        return _fallback_read(p)
    return read_series(p) if p.is_dir() else read(p)


def _fallback_read(p: Path) -> Any:
    from medfm.data.sample import Sample

    if p.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(p))
        a = np.asarray(img.dataobj).transpose(2, 1, 0)[None]
        zooms = img.header.get_zooms()[:3]
        return Sample(array=a, spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])), path=str(p))
    from PIL import Image

    with Image.open(p) as im:
        a = np.asarray(im)
    a = np.moveaxis(a, -1, 0) if a.ndim == 3 else a[None]
    return Sample(array=a, spacing=(1.0, 1.0), path=str(p))
