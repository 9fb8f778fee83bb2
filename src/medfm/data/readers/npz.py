"""NumPy archives: MedMNIST dataset files (train/val/test splits) and single-image .npz / .npy files.

Never unpickles: arrays are loaded with ``allow_pickle=False``; object arrays are refused. Array headers are
read from the zip members first so absurd shapes are refused before anything is decompressed.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from medfm.data.readers.common import apply_nan_policy, check_file, check_voxels, exc_text
from medfm.data.sample import Sample
from medfm.errors import InputError

SPLITS = ("train", "val", "test")
_IMAGE_KEYS = ("image", "images", "img", "array", "data", "arr_0")


def _npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of the .npy stream `f` (positioned at its start); no data read."""
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(f)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def npz_headers(path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) of every array in an .npz, read from the member headers only."""
    p = check_file(path)
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(p) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    out[name[:-4]] = _npy_header(f)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise InputError(p, f"truncated or corrupt .npz archive ({exc_text(e)})") from None
    if not out:
        raise InputError(p, "zip archive holds no .npy arrays (not a NumPy .npz file)")
    return out


def _load_key(p: Path, key: str) -> np.ndarray:
    try:
        with np.load(p, allow_pickle=False) as z:
            return z[key]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise InputError(
                p, f"array '{key}' holds Python objects; refusing to unpickle untrusted data"
            ) from None
        raise InputError(p, f"corrupt array '{key}' ({exc_text(e)})") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise InputError(p, f"truncated or corrupt array '{key}' ({exc_text(e)})") from None


def is_medmnist(headers: dict[str, Any]) -> bool:
    return any(f"{s}_images" in headers for s in SPLITS)


def _medmnist_channel_first(images: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, 3) -> (N, 3, H, W); (N, D, H, W) -> (N, 1, D, H, W)."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
        return np.ascontiguousarray(np.moveaxis(images, -1, 1))
    if images.ndim == 4:
        return images[:, None]
    raise ValueError(f"unexpected MedMNIST image array shape {images.shape}")


def read_medmnist_npz(
    path: str | Path,
    splits: tuple[str, ...] = SPLITS,
    channel_first: bool = True,
    max_voxels: int | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MedMNIST archive -> {split: (images, labels)}.

    images: channel-first (N, C, H, W) for 2D sets (C=1 grey, 3 RGB) or (N, 1, D, H, W) for the 3D sets;
    ``channel_first=False`` returns them as stored ((N, H, W), (N, H, W, 3), (N, D, H, W)).
    labels: (N, K) integer (K=1 for single-label tasks, K=14 for ChestMNIST), as in the official files.
    Works for every size (28, 64, 128, 224); only the requested splits are decompressed.
    """
    p = check_file(path)
    heads = npz_headers(p)
    if not is_medmnist(heads):
        raise InputError(
            p,
            f"not a MedMNIST archive: expected keys like train_images/train_labels, found "
            f"{sorted(heads)[:6]}",
        )
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in splits:
        ik, lk = f"{split}_images", f"{split}_labels"
        if ik not in heads:
            continue
        if lk not in heads:
            raise InputError(p, f"has '{ik}' but no '{lk}'")
        ishape, lshape = heads[ik][0], heads[lk][0]
        if len(ishape) not in (3, 4):
            raise InputError(
                p, f"'{ik}' has shape {ishape}; expected (N, H, W), (N, H, W, 3) or (N, D, H, W)"
            )
        if ishape[0] != lshape[0]:
            raise InputError(p, f"'{ik}' has {ishape[0]} images but '{lk}' has {lshape[0]} labels")
        check_voxels(p, ishape[1:], max_voxels)
        images, labels = _load_key(p, ik), _load_key(p, lk)
        if images.dtype.kind == "f" and not np.isfinite(images).all():
            raise InputError(p, f"'{ik}' contains NaN or Inf values")
        labels = labels.reshape(len(labels), -1)
        out[split] = (_medmnist_channel_first(images) if channel_first else images, labels)
    if not out:
        raise InputError(p, f"none of the splits {list(splits)} is in the archive")
    return out


def _to_channel_first(arr: np.ndarray, layout: str, p: Path) -> tuple[np.ndarray, str]:
    if layout == "auto":
        if arr.ndim == 2:
            layout = "hw"
        elif arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] not in (1, 3, 4):
            layout = "hwc"
        elif arr.ndim == 3 and arr.shape[0] in (1, 3, 4):
            layout = "chw"
        elif arr.ndim == 3:
            layout = "dhw"
        elif arr.ndim == 4:
            layout = "cdhw"
        else:
            raise InputError(p, f"array of shape {arr.shape} is not an image (expected 2 to 4 dimensions)")
    expect = {"hw": 2, "hwc": 3, "chw": 3, "dhw": 3, "cdhw": 4}
    if layout not in expect:
        raise InputError(p, f"unknown layout {layout!r}; use one of {sorted(expect)} or 'auto'")
    if arr.ndim != expect[layout]:
        raise InputError(p, f"array of shape {arr.shape} does not match layout {layout!r}")
    if layout == "hwc":
        arr = np.moveaxis(arr, -1, 0)[:3]
    elif layout in ("hw", "dhw"):
        arr = arr[None]
    return np.ascontiguousarray(arr), layout


def probe_npz(path: str | Path) -> dict[str, Any]:
    p = check_file(path)
    with open(p, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            f.seek(0)
            shape, dtype = _npy_header(f)
            return {"format": "npy", "shape": shape, "dtype": str(dtype)}
    heads = npz_headers(p)
    if is_medmnist(heads):
        return {
            "format": "medmnist_npz",
            "splits": {s: heads[f"{s}_images"][0][0] for s in SPLITS if f"{s}_images" in heads},
            "image_shape": heads[next(k for k in heads if k.endswith("_images"))][0][1:],
        }
    key = next((k for k in _IMAGE_KEYS if k in heads), next(iter(heads)))
    return {"format": "npz", "key": key, "shape": heads[key][0], "dtype": str(heads[key][1])}


def read_npz(
    path: str | Path,
    key: str | None = None,
    layout: str = "auto",
    split: str | None = None,
    index: int | None = None,
    max_voxels: int | None = None,
    nan_policy: str = "error",
    **_: Any,
) -> Sample:
    """One image from an .npz (key ``image``/``arr_0``/...; optional ``spacing``) or an .npy file.

    A MedMNIST archive needs ``split=`` and ``index=`` (one image of it); use read_medmnist_npz for all.
    layout: "auto" (guess), "hw", "hwc", "chw", "dhw" or "cdhw".
    """
    p = check_file(path)
    meta: dict[str, Any] = {"format": "npz"}
    spacing = None
    with open(p, "rb") as f:
        is_npy = f.read(6) == b"\x93NUMPY"
    if is_npy:
        meta["format"] = "npy"
        if probe_npz(p)["dtype"] == "object":  # from the header: nothing is unpickled
            raise InputError(p, "array holds Python objects; refusing to unpickle untrusted data")
        try:
            arr = np.load(p, allow_pickle=False, mmap_mode="r")
        except ValueError as e:
            raise InputError(
                p, f"cannot load .npy without unpickling, or it is corrupt ({exc_text(e)})"
            ) from None
        check_voxels(p, arr.shape, max_voxels)
        arr = np.array(arr)
    else:
        heads = npz_headers(p)
        if is_medmnist(heads):
            if split is None or index is None:
                raise InputError(
                    p,
                    "is a MedMNIST archive: pass split= and index= for one image, or use "
                    "read_medmnist_npz for the whole dataset",
                )
            images, labels = read_medmnist_npz(p, splits=(split,), max_voxels=max_voxels)[split]
            if not 0 <= index < len(images):
                raise InputError(p, f"index {index} out of range for split '{split}' ({len(images)} images)")
            lab = labels[index].tolist()
            return Sample(
                array=np.ascontiguousarray(images[index]),
                spacing=(1.0,) * (images.ndim - 2),
                meta={"format": "medmnist_npz", "split": split, "index": index, "label": lab},
                path=str(p),
            )
        if key is None:
            key = next((k for k in _IMAGE_KEYS if k in heads), None)
            if key is None:
                cands = [k for k in heads if k != "spacing"]
                if len(cands) != 1:
                    raise InputError(
                        p, f"cannot tell which array is the image among {sorted(heads)}; pass key="
                    )
                key = cands[0]
        elif key not in heads:
            raise InputError(p, f"no array named '{key}' (has {sorted(heads)})")
        check_voxels(p, heads[key][0], max_voxels)
        arr = _load_key(p, key)
        meta["key"] = key
        if "spacing" in heads:
            spacing = tuple(float(s) for s in np.ravel(_load_key(p, "spacing")))
    if arr.dtype.kind not in "uifb":
        raise InputError(p, f"array dtype {arr.dtype} is not numeric")
    arr, layout = _to_channel_first(arr, layout, p)
    meta["layout"] = layout
    arr = apply_nan_policy(p, arr, nan_policy, meta)
    nsp = arr.ndim - 1
    if spacing is None or len(spacing) != nsp:
        if spacing is not None:
            meta["note_spacing"] = f"stored spacing {spacing} does not fit {nsp} spatial axes; using 1.0"
        spacing = (1.0,) * nsp
    return Sample(array=arr, spacing=spacing, orientation=None, meta=meta, path=str(p))
