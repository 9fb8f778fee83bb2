"""Mask post-processing: keep the N largest connected components per class and fill holes.

A standard clean-up for organs with a known number of parts (two lungs): it removes small false-positive
islands and pin-holes that a low-resolution decoder leaves, which mostly improves HD95 and a little Dice.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from medfm.errors import ConfigError


def clean_binary(mask: np.ndarray, keep: int | None = 2, fill_holes: bool = True) -> np.ndarray:
    """Largest ``keep`` connected components of a binary mask (None keeps all), holes filled (2D or 3D)."""
    m = np.asarray(mask, dtype=bool)
    if keep is not None:
        if keep < 1:
            raise ConfigError(f"keep must be >= 1 components, got {keep}")
        lab, n = ndimage.label(m)
        if n > keep:
            sizes = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
            # the `keep` largest labels (ids start at 1)
            largest = np.argsort(sizes)[::-1][:keep] + 1
            m = np.isin(lab, largest)
    if fill_holes:
        m = ndimage.binary_fill_holes(m)
    return m


def clean_labels(
    labels: torch.Tensor, keep: int | None = 2, fill_holes: bool = True, classes: list[int] | None = None
) -> torch.Tensor:
    """Apply ``clean_binary`` to each foreground class of an integer label map (*S) (no batch axis).

    Pixels removed from a class become background; filled holes take the class (on top of other labels,
    processed in class order, so with adjacent classes the later class wins).
    """
    arr = labels.detach().cpu().numpy()
    out = np.zeros_like(arr)
    ks = classes if classes is not None else [int(k) for k in np.unique(arr) if k != 0]
    for k in ks:
        out[clean_binary(arr == k, keep, fill_holes)] = k
    # classes not asked for are kept as they are
    untouched = ~np.isin(arr, [0, *ks])
    out[untouched] = arr[untouched]
    return torch.from_numpy(out).to(labels.device)
