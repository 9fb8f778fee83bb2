"""Image-text data for the vision-language commands. The dataset and raw-input reading live in
``medfm.data.pairs`` (training imports them from there, so ``train`` never depends on ``tasks``); their names
are re-exported here for existing importers. This module keeps the tiny toy-pair writer for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfm.data.pairs import ImageTextDataset  # noqa: F401  (re-exported: benchmarks import it from here)

TOY_FINDINGS = {
    "effusion": ("Small pleural effusion.", "No pleural effusion."),
    "nodule": ("A nodule is seen in the right lung.", "No nodule."),
}


def write_toy_pairs(out: str | Path, n: int = 32, size: int = 32, seed: int = 0) -> Path:
    """A tiny prepared image-report dataset (store layout) whose reports describe what is drawn.

    Effusion = a bright band at the bottom, nodule = a bright disc; reports say so or negate it. For fast
    tests and smoke runs; the realistic synthetic data is ``medfm data phantom``.
    """
    import pandas as pd

    from medfm.data.preprocess import make_spec
    from medfm.data.store_writer import StoreWriter
    from medfm.data.summary import Summary

    out = Path(out)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    imgs, rows = [], []
    for i in range(n):
        lab = {"effusion": int(rng.random() < 0.5), "nodule": int(rng.random() < 0.5)}
        a = 0.2 + 0.05 * rng.standard_normal((size, size))
        if lab["effusion"]:
            a[yy > 0.75] += 0.6
        if lab["nodule"]:
            cy, cx = rng.uniform(0.25, 0.55), rng.uniform(0.25, 0.75)
            a[(yy - cy) ** 2 + (xx - cx) ** 2 < 0.012] += 0.6
        imgs.append((np.clip(a, 0, 1) * 255).astype(np.uint8)[None])
        text = " ".join(TOY_FINDINGS[k][0 if v else 1] for k, v in lab.items())
        rows.append(
            {
                "case_id": f"toy{i:04d}",
                "shard": 0,
                "index": i,
                "split": "train" if i < int(0.75 * n) else "test",
                "patient_id": f"p{i // 2}",
                "study_id": "",
                "site": "toy",
                "sex": "",
                "age": np.nan,
                "report": f"FINDINGS: {text} IMPRESSION: {'Abnormal.' if any(lab.values()) else 'Normal.'}",
                "has_mask": False,
                "source": "toy",
                "orig_shape": "",
                "orig_spacing": "",
                **lab,
            }
        )
    w = StoreWriter(out)
    w.write_shard(0, np.stack(imgs))
    w.write_manifest(pd.DataFrame(rows))
    w.write_summary(Summary(
        n_cases=n, task="multilabel", label_columns=list(TOY_FINDINGS), image_shape=[1, size, size],
        # what `prepare` would record for 8-bit pictures of this size (replayed on raw inference inputs)
        preprocessing=make_spec(size=size, resize_mode="stretch", channels=1),
    ))
    return out
