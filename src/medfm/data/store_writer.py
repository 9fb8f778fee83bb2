"""The one writer of prepared datasets (layout in store.py): shards, manifest, summary — all atomic.

``prepare``, the synthetic store (train/synthetic.py) and the benchmarks' pooled store all write through
:class:`StoreWriter`, so every store on disk has the same files and a summary that reads back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfm.data.summary import SUMMARY_FILE, Summary

PARTS_DIR = "parts"  # per-shard manifest rows of an unfinished prepare run (joined by joined_parts)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write an .npy file under a temporary name, fsync, then rename (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomic JSON write (temporary file + rename); one implementation for the whole project."""
    from medfm.rundir import write_json

    write_json(path, obj)


def _parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


class StoreWriter:
    """Writes one prepared dataset at ``root``; the summary is written last (it marks the store done)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def write_shard(self, k: int, images: np.ndarray, masks: np.ndarray | None = None) -> None:
        save_npy_atomic(self.root / "images" / shard_name(k), images)
        if masks is not None:
            save_npy_atomic(self.root / "masks" / shard_name(k), masks)

    def write_part(self, k: int, rows: pd.DataFrame) -> None:
        """The manifest rows of shard `k` (a resumable run keeps them until prepare finalises)."""
        _parquet_atomic(rows, self.root / PARTS_DIR / f"{k:05d}.parquet")

    def joined_parts(self, columns: list[str]) -> pd.DataFrame:
        """All part tables in shard order (an empty table with `columns` when there are none)."""
        d = self.root / PARTS_DIR
        parts = sorted(d.glob("*.parquet")) if d.is_dir() else []
        if not parts:
            return pd.DataFrame(columns=columns)
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    def write_manifest(self, df: pd.DataFrame) -> None:
        _parquet_atomic(df, self.root / "manifest.parquet")

    def write_summary(self, summary: Summary) -> Summary:
        """Validate (as a reader would) and write summary.json; returns the summary as read back."""
        checked = Summary.from_dict(summary.to_dict(), self.root / SUMMARY_FILE)
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / SUMMARY_FILE, checked.to_dict())
        return checked

    def drop_parts(self) -> None:
        import shutil

        shutil.rmtree(self.root / PARTS_DIR, ignore_errors=True)
