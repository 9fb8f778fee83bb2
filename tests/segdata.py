"""Small on-disk segmentation datasets for the tests: PNG discs (2D) or NIfTI balls (3D) + manifest.csv;
the last two cases are the test split."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from PIL import Image


def disk_dataset(root, n=12, size=32, three_d=False):
    rng = np.random.default_rng(0)
    rows = ["image,mask,split"]
    for i in range(n):
        if three_d:
            zz, yy, xx = np.mgrid[:24, :16, :16]
            c = rng.integers(5, 11, 3)
            m = (((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < 16).astype(np.uint8)
            img = (m * 150 + rng.integers(0, 60, m.shape)).astype(np.int16)
            aff = np.diag([1.0, 1.0, 2.0, 1.0])
            nib.save(nib.Nifti1Image(img.transpose(2, 1, 0), aff), str(root / f"im{i}.nii.gz"))
            nib.save(nib.Nifti1Image(m.transpose(2, 1, 0), aff), str(root / f"m{i}.nii.gz"))
            rows.append(f"im{i}.nii.gz,m{i}.nii.gz,{'train' if i < n - 2 else 'test'}")
            continue
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.integers(10, size - 10, 2)
        m = (((yy - cy) ** 2 + (xx - cx) ** 2) < 36).astype(np.uint8) * 255
        img = np.clip(m * 0.6 + rng.integers(0, 60, m.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"im{i}.png")
        Image.fromarray(m).save(root / f"m{i}.png")
        rows.append(f"im{i}.png,m{i}.png,{'train' if i < n - 2 else 'test'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
