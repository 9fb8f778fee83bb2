"""What the PACS side of medfm passes around: one instance's model output, and the short UID keys used in
file names and logs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom

# What medfm writes into every result object, and how the watcher recognises its own results.
MANUFACTURER = "medfm"
# Objects without an image to analyse (medfm's own SR/SEG among them).
NON_IMAGE_MODALITIES = frozenset({"SR", "SEG", "PR", "KO", "DOC", "REG", "RTSTRUCT", "RTPLAN"})


@dataclass
class InstanceResult:
    """What a model found on one source DICOM instance, ready to be written back as DICOM."""

    source: pydicom.Dataset  # the source instance (with pixel data)
    findings: list[dict[str, Any]]  # {"name": str, "probability": float, "positive": bool}
    mask: np.ndarray | None = None  # uint8 label map (Rows, Columns) on the source pixels; 0 = background
    segment_names: list[str] = field(default_factory=list)  # name of label 1, 2, ...
    model: dict[str, str] = field(default_factory=dict)  # {"name", "hash" (short weights sha256), "version"}


def uid_key(uid: str, prefix: str = "") -> str:
    """A short stable key for a UID (file names, state, logs): prefix + 16 hex chars of sha256(uid).

    UIDs are not patient identifiers, but hashed forms keep logs and paths short and uniform.
    """
    return prefix + hashlib.sha256(str(uid).encode("ascii", "replace")).hexdigest()[:16]


def is_medfm_result(row: dict[str, Any]) -> bool:
    """True for a QIDO row (or header dict) of an object medfm wrote: its manufacturer or series says so."""
    manufacturer = str(row.get("Manufacturer") or "").strip().lower()
    description = str(row.get("SeriesDescription") or "").strip().lower()
    return manufacturer == MANUFACTURER or description.startswith(MANUFACTURER + " ")
