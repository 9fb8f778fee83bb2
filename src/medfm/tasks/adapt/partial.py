"""Per-run results of `medfm adapt` written as each run finishes, so a killed job resumes where it stopped.

Layout: ``OUT/partial/<run_id>.parquet`` (test predictions) then ``OUT/partial/<run_id>.json`` (the result row
and the key of the experiment it belongs to). The JSON is written last and atomically, so its presence means
the run is complete; a row whose key differs (other data, encoder or hyper-parameters) is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from medfm.rundir import read_json, write_json

# settings that do not change any single run's result: which runs are planned, and housekeeping
_NOT_IN_KEY = ("methods", "budgets", "seeds", "first_seed", "save_adapters", "save_model",
               "feature_batch_size")


def experiment_key(cfg_dict: dict[str, Any], fingerprint: str, data_dir: str | Path,
                   n: dict[str, int]) -> str:
    """A short hash of everything that defines one run's result apart from (method, budget, seed)."""
    spec = {k: v for k, v in cfg_dict.items() if k not in _NOT_IN_KEY}
    blob = json.dumps({"cfg": spec, "encoder": fingerprint, "data": str(Path(data_dir).resolve()), "n": n},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_done(folder: Path, run_id: str, key: str) -> tuple[dict, pd.DataFrame] | None:
    """The stored (row, predictions) of ``run_id`` when it finished under the same experiment key."""
    js, pq = folder / f"{run_id}.json", folder / f"{run_id}.parquet"
    if not (js.is_file() and pq.is_file()):
        return None
    try:
        rec = read_json(js)
        preds = pd.read_parquet(pq)
    except Exception:  # a damaged partial file is simply recomputed
        return None
    if not isinstance(rec, dict) or rec.get("key") != key:
        return None
    return rec["row"], preds


def save_done(folder: Path, run_id: str, key: str, row: dict, preds: pd.DataFrame) -> None:
    """Store one finished run: predictions first, then the row (atomic; its presence marks completion)."""
    folder.mkdir(parents=True, exist_ok=True)
    pq = folder / f"{run_id}.parquet"
    tmp = folder / f".{run_id}.{os.getpid()}.parquet.tmp"
    try:
        preds.to_parquet(tmp, index=False)
        os.replace(tmp, pq)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(folder / f"{run_id}.json", {"key": key, "row": row})
