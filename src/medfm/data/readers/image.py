"""PNG / JPEG (and TIFF, BMP) pictures through Pillow, keeping 8- or 16-bit depth."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from medfm.data.readers.common import (
    DEFAULT_MAX_VOXELS,
    apply_nan_policy,
    check_file,
    check_voxels,
    exc_text,
)
from medfm.data.sample import Sample
from medfm.errors import InputError

# Pillow refuses images over 2 * MAX_IMAGE_PIXELS at open(); align its threshold with medfm's default limit
# (which we check ourselves first). A caller asking for a larger limit gets Pillow's raised under a lock.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, DEFAULT_MAX_VOXELS // 2)
_PIL_LOCK = threading.Lock()


def _open(path: Path, max_voxels: int | None) -> Image.Image:
    limit = DEFAULT_MAX_VOXELS if max_voxels is None else int(max_voxels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if limit > 2 * (Image.MAX_IMAGE_PIXELS or 0):
                with _PIL_LOCK:
                    old = Image.MAX_IMAGE_PIXELS
                    Image.MAX_IMAGE_PIXELS = limit // 2 + 1
                    try:
                        im = Image.open(path)
                    finally:
                        Image.MAX_IMAGE_PIXELS = old
            else:
                im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise InputError(
            path, f"declared image size is absurd (possible decompression bomb): {exc_text(e)}"
        ) from None
    except UnidentifiedImageError:
        raise InputError(path, "not a readable image: Pillow cannot identify the content") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(path, f"corrupt or truncated image header ({exc_text(e)})") from None
    w, h = im.size
    check_voxels(path, (h, w), max_voxels)
    return im


def probe_image(path: str | Path, max_voxels: int | None = None) -> dict[str, Any]:
    """Format, shape and depth from the header only."""
    p = check_file(path)
    im = _open(p, max_voxels)
    w, h = im.size
    colour = im.mode in ("RGB", "RGBA", "CMYK", "YCbCr") or (im.mode == "P" and not _palette_is_grey(im))
    c = 3 if colour else 1
    return {
        "format": (im.format or "image").lower(),
        "shape": (c, h, w),
        "spacing": (1.0, 1.0),
        "mode": im.mode,
        "bit_depth": 16 if im.mode.startswith("I;16") or im.mode == "I" else 8,
    }


def _palette_is_grey(im: Image.Image) -> bool:
    pal = im.getpalette() or []
    rgb = np.asarray(pal, dtype=np.int32).reshape(-1, 3) if len(pal) >= 3 else np.zeros((0, 3))
    return bool(len(rgb)) and bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))


def read_image(
    path: str | Path,
    grey: bool = False,
    palette_index: bool = False,
    max_voxels: int | None = None,
    nan_policy: str = "error",
    **_: Any,
) -> Sample:
    """Read a 2D picture as (C, H, W): C=1 grey or C=3 RGB; alpha dropped; uint8 / uint16 kept.

    grey: convert colour to one luminance channel. palette_index: for palette ("P") images, return the
    palette indices (label maps stored as palette PNGs) instead of their colours.
    """
    p = check_file(path)
    im = _open(p, max_voxels)
    mode0 = im.mode
    meta: dict[str, Any] = {"format": (im.format or "image").lower(), "mode": mode0}
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise InputError(p, f"image too large to decode safely: {exc_text(e)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(p, f"truncated or corrupt image data ({exc_text(e)})") from None

    if im.mode == "P":
        if palette_index:
            arr = np.asarray(im)
            meta["palette_index"] = True
        elif "transparency" in im.info:
            im = im.convert("RGBA")
        else:
            im = im.convert("L" if _palette_is_grey(im) else "RGB")
    if im.mode == "1":
        im = im.convert("L")
    if im.mode in ("LA", "La", "PA"):
        im = im.convert("L") if im.mode != "PA" else im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        meta["alpha_dropped"] = mode0 in ("RGBA", "LA", "PA", "P") or "A" in im.mode
        im = im.convert("RGB")
    if grey and im.mode == "RGB":
        im = im.convert("L")
        meta["converted_to_grey"] = True

    if not meta.get("palette_index"):
        arr = np.asarray(im)
    if im.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # 16-bit files that Pillow widened to 32-bit
    elif im.mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = np.ascontiguousarray(np.moveaxis(arr, -1, 0))
    if grey and arr.shape[0] == 3:  # 16-bit RGB is rare in Pillow; average rather than fail
        arr = arr.mean(axis=0, keepdims=True).astype(arr.dtype)
    arr = apply_nan_policy(p, arr, nan_policy, meta)
    meta["bit_depth"] = int(arr.dtype.itemsize * 8) if arr.dtype.kind in "ui" else 32
    meta["channels"] = int(arr.shape[0])
    return Sample(array=arr, spacing=(1.0, 1.0), orientation=None, meta=meta, path=str(p))
