"""Contact sheet of generated cases (matplotlib), for eyeballing plausibility and for the demo overview."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.phantom.cohort import FINDINGS
from medfm.errors import InputError

_SHORT = {
    "nodule": "nod",
    "effusion": "eff",
    "consolidation": "cons",
    "cardiomegaly": "cmeg",
    "pneumothorax": "ptx",
}


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    a = np.asarray(Image.open(path)).astype(np.float32)
    return a / (4095.0 if a.max() > 255 else 255.0)


def _ct_views(img_path: Path, mask_path: Path | None) -> np.ndarray:
    """Axial slice (through the largest finding, else mid-heart) beside a coronal slice, lung window."""
    import nibabel as nib
    from scipy import ndimage as ndi

    nii = nib.load(str(img_path))
    sx, _, sz = (float(z) for z in nii.header.get_zooms()[:3])
    v = np.asarray(nii.dataobj).transpose(2, 1, 0)  # (z, y, x)
    z = v.shape[0] // 2
    if mask_path is not None and mask_path.is_file():
        m = np.asarray(nib.load(str(mask_path)).dataobj).transpose(2, 1, 0)
        per = (m > 0).sum(axis=(1, 2))
        if per.max() > 0:
            z = int(np.argmax(per))
    ax = v[z][::-1, ::-1]  # anterior up, patient right on the image left
    co = ndi.zoom(v[:, v.shape[1] // 2 + 4][::-1, ::-1].astype(np.float32), (sz / sx, 1.0), order=1)
    h = ax.shape[0]  # physical aspect, then crop/pad to the axial height
    co = co[max(0, (co.shape[0] - h) // 2) :][:h]
    co = np.pad(co, ((0, h - co.shape[0]), (0, 0)), constant_values=-1000.0)
    win = lambda a: np.clip((a + 1000.0) / 1400.0, 0, 1)  # noqa: E731  window [-1000, 400] HU
    return np.concatenate([win(ax), win(co)], 1)


def montage(root: str | Path, out_png: str | Path, n: int = 16, cols: int = 4) -> Path:
    """Render the first `n` cases of a phantom folder as a grid with site and label captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    man = root / "manifest.csv"
    if not man.is_file():
        raise InputError(root, "no manifest.csv; generate the set with `medfm data phantom` first")
    df = pd.read_csv(man, keep_default_na=False).head(n)
    rows = int(np.ceil(len(df) / cols))
    is_ct = str(df["image"].iloc[0]).endswith(".nii.gz")
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (4.0 if is_ct else 2.6), rows * 2.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, row) in zip(axes.ravel(), df.iterrows()):
        if is_ct:
            fm = row.get("mask_findings") or None
            img = _ct_views(root / row["image"], root / fm if fm else None)
        else:
            img = _load_png(root / row["image"])
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        labels = [_SHORT[f] for f in FINDINGS if int(row[f])] or ["normal"]
        ax.set_title(f"{row['site']} {row['sex']}{row['age']}\n{' '.join(labels)}", fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
