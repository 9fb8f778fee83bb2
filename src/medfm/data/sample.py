"""The one in-memory image type every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Sample:
    """A decoded medical image.

    array:  channel-first. 2D images are (C, H, W); volumes are (C, D, H, W) with D the slice axis
            (slowest varying), H rows, W columns — the layout torch's Conv3d expects.
    spacing: physical size of one pixel/voxel in mm, one value per spatial axis, in the array's order
            ((sy, sx) for 2D, (sz, sy, sx) for 3D); 1.0 where the format does not say.
    orientation: for volumes, the anatomical code of the (W, H, D) axes, i.e. of voxel (x, y, z)
            directions, e.g. "RAS" after canonicalisation; None for plain 2D pictures.
    meta:   format-specific details (modality, photometric interpretation, window, bit depth, ...).
            Never patient identifiers unless the caller asked for them (see medfm.data.deid).
    path:   the file (or folder, for a DICOM series) the sample came from.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    orientation: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - 1

    @property
    def channels(self) -> int:
        return int(self.array.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[1:])
