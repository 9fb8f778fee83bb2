"""The prepared-dataset format: fixed-size shards of memory-mapped arrays + a manifest table.

Layout of a prepared dataset directory::

    summary.json            format version, counts, image shape/dtype, label columns and task, skipped files
                            (fields: medfm.data.summary.Summary; written by store_writer.StoreWriter)
    manifest.parquet        one row per kept case (see MANIFEST_COLUMNS) + label columns + provenance
    images/shard-00000.npy  (n, C, H, W) or (n, C, D, H, W); uint8 (value/255) or float16 (values as stored)
    masks/shard-00000.npy   (n, H, W) or (n, D, H, W) uint8 label maps (0 = background), when masks exist

Shards are plain ``.npy`` files so they can be memory-mapped (``np.load(mmap_mode="r")``) by any number of
loader workers without copying, and written one at a time so preparing 10^6 images never holds more than
one shard in memory. A shard file is written under a temporary name and renamed when complete, so an
interrupted run never leaves a half-written shard that looks finished.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medfm.data.preprocess import to_tensor
from medfm.data.store_writer import StoreWriter, save_npy_atomic, shard_name, write_json_atomic
from medfm.data.summary import FORMAT_VERSION, Summary, load_summary
from medfm.errors import InputError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_COLUMNS",
    "PreparedDataset",
    "StoreWriter",
    "Summary",
    "load_summary",
    "read_manifest",
    "read_summary",
    "save_npy_atomic",
    "shard_name",
    "write_json_atomic",
]

# Columns every manifest has (label columns and provenance columns come after these).
MANIFEST_COLUMNS = [
    "case_id",
    "shard",
    "index",
    "split",
    "patient_id",
    "study_id",
    "site",
    "sex",
    "age",
    "report",
    "has_mask",
    "source",
    "orig_shape",
    "orig_spacing",
]


def read_summary(root: str | Path) -> dict[str, Any]:
    """The validated summary.json of a prepared dataset, as a dict (see medfm.data.summary)."""
    return load_summary(root).to_dict()


def read_manifest(root: str | Path) -> pd.DataFrame:
    root = Path(root)
    for name in ("manifest.parquet", "manifest.csv"):
        p = root / name
        if p.is_file():
            df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
            return df
    raise InputError(root, "prepared dataset has no manifest.parquet")


class PreparedDataset(Dataset):
    """Torch dataset over a prepared directory.

    Each item is a dict: ``image`` float32 tensor (C, H, W) / (C, D, H, W) scaled to [0, 1] for uint8 shards;
    ``mask`` int64 tensor (H, W) / (D, H, W) when the case has one; ``label`` (int64 scalar for
    binary/multiclass, float32 vector for multilabel) when the dataset has labels; ``text`` (report, "" if
    none); ``case_id``, ``patient_id``, ``site``, ``index`` (row in this dataset).
    """

    def __init__(
        self,
        root: str | Path,
        split: str | list[str] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.summary = read_summary(self.root)
        df = full = read_manifest(self.root)
        if split is not None:
            splits = [split] if isinstance(split, str) else list(split)
            df = full[full["split"].isin(splits)]
            if len(df) == 0:
                have = sorted(full["split"].dropna().unique())
                raise InputError(self.root, f"no cases in split {splits}; splits present: {have}")
        self.manifest = df.reset_index(drop=True)
        self.label_columns: list[str] = list(self.summary.get("label_columns", []))
        self.task: str | None = self.summary.get("task")
        self.transform = transform
        self._images: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.ndarray] = {}
        self._cols_for: pd.DataFrame | None = None
        self._cols: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.manifest)

    def _shard(self, kind: str, i: int) -> np.ndarray:
        cache = self._images if kind == "images" else self._masks
        if i not in cache:  # opened lazily so each DataLoader worker maps its own view
            cache[i] = np.load(self.root / kind / shard_name(i), mmap_mode="r")
        return cache[i]

    def _columns(self) -> dict[str, Any]:
        """Per-row values as plain arrays/lists: pandas row access costs ~1 ms per item, these ~1 us.

        Rebuilt whenever ``self.manifest`` is replaced (e.g. filtered by a caller).
        """
        if self._cols_for is not self.manifest:
            df = self.manifest

            def strings(col: str) -> list[str]:
                if col not in df.columns:
                    return [""] * len(df)
                return [
                    "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in df[col]
                ]

            report = df["report"] if "report" in df.columns else [None] * len(df)
            self._cols = {
                "shard": df["shard"].to_numpy(np.int64),
                "index": df["index"].to_numpy(np.int64),
                "has_mask": (
                    df["has_mask"].fillna(False).to_numpy(bool)
                    if "has_mask" in df.columns
                    else np.zeros(len(df), bool)
                ),
                "text": [r if isinstance(r, str) else "" for r in report],
                "case_id": strings("case_id"),
                "patient_id": strings("patient_id"),
                "site": strings("site"),
                "labels": self.labels(),
            }
            self._cols_for = df
        return self._cols

    def image_array(self, i: int) -> np.ndarray:
        c = self._columns()
        return np.asarray(self._shard("images", int(c["shard"][i]))[int(c["index"][i])])

    def labels(self) -> np.ndarray | None:
        """All labels of this split as an array ((n,) ints or (n, k) multi-hot), or None."""
        if not self.label_columns:
            return None
        vals = self.manifest[self.label_columns].to_numpy()
        return vals.astype(np.float32) if self.task == "multilabel" else vals[:, 0].astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self._columns()
        item: dict[str, Any] = {
            "image": to_tensor(self.image_array(i)),
            "text": c["text"][i],
            "case_id": c["case_id"][i],
            "patient_id": c["patient_id"][i],
            "site": c["site"][i],
            "index": i,
        }
        if c["has_mask"][i]:
            m = self._shard("masks", int(c["shard"][i]))[int(c["index"][i])]
            item["mask"] = torch.from_numpy(np.asarray(m).astype(np.int64))
        if c["labels"] is not None:
            vals = c["labels"][i]
            if self.task == "multilabel":
                item["label"] = torch.tensor(vals, dtype=torch.float32)
            else:
                item["label"] = torch.tensor(int(vals), dtype=torch.long)
        if self.transform is not None:
            item = self.transform(item)
        return item
