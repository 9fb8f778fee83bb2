"""The per-case work of `prepare`: read, normalise and resize one case, in this process or a pool worker.

Errors never escape a case: they become one line in the result (the case is skipped and listed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from medfm.data.preprocess import modality_for, preprocess_sample
from medfm.data.refs import read_ref
from medfm.errors import MedfmError

_SETTINGS: dict[str, Any] = {}


def set_settings(settings: dict[str, Any]) -> None:
    _SETTINGS.clear()
    _SETTINGS.update(settings)


def init_worker(settings: dict[str, Any]) -> None:
    """Initializer of a pool worker process (never call it in the main process: it pins threads)."""
    # One thread per worker: the pool is the parallelism; nested BLAS/torch threads only contend.
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    set_settings(settings)


def _one_line(e: BaseException, ref: str) -> str:
    if isinstance(e, MedfmError):
        msg = str(e)
    else:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        msg = f"{ref}: {type(e).__name__}{': ' + text if text else ''}"
    return msg.splitlines()[0][:500]


def process_case(job: tuple[str, str, str]) -> dict[str, Any]:
    """Read, normalise and resize one case (image + optional mask); errors become one line, never raise."""
    ref, mask_ref, modality = job
    spec = dict(_SETTINGS, modality=modality or _SETTINGS.get("modality"))
    current = ref
    try:
        sample = read_ref(ref)
        arr = np.asarray(sample.array)
        mask_sample = None
        if mask_ref:
            current = mask_ref
            mask_sample = read_ref(mask_ref)
            mask_sample.path = mask_sample.path or mask_ref
            current = ref
        # Fixed in the spec so preprocessing does not guess it again (a full pass over a 3D volume).
        mod = spec["modality"] = modality_for(sample, spec)
        if mask_sample is None:
            stored, mask = preprocess_sample(sample, spec), None
        else:
            stored, mask = preprocess_sample(sample, spec, mask=mask_sample)
        dims = arr.ndim - 1
        meta = sample.meta or {}
        notes = [f"{k}: {v}" for k, v in meta.items() if k.startswith("note")] + [
            str(w) for w in (meta.get("warnings") or [])
        ]
        sex = str(meta.get("patient_sex", "")).upper()
        return {
            "ok": True,
            "dims": dims,
            "image": stored,
            "mask": mask,
            "orig_shape": json.dumps([int(x) for x in arr.shape]),
            "orig_spacing": json.dumps([round(float(x), 4) for x in sample.spacing]),
            "modality": mod,
            "reader_notes": "; ".join(notes),
            "from_dicom": str(meta.get("format", "")).lower() == "dicom",
            # Sex/age from DICOM headers fill empty manifest cells (fairness audits need them).
            "sex": sex if sex in ("M", "F") else "",
            "age": float(meta["patient_age"]) if meta.get("patient_age") is not None else float("nan"),
        }
    except Exception as e:  # noqa: BLE001 - a bad file is skipped and reported, never fatal
        return {"ok": False, "error": _one_line(e, current)}


def case_jobs(rows: pd.DataFrame, modality: str | None) -> list[tuple[str, str, str]]:
    return [
        (str(r.image), str(r.mask), modality or "") for r in rows[["image", "mask"]].itertuples(index=False)
    ]


def decode(jobs: list, pool: ProcessPoolExecutor | None, workers: int) -> Iterator[dict[str, Any]]:
    """Results in job order; a pool decodes ahead within the shard (never beyond it)."""
    if pool is None:
        yield from map(process_case, jobs)
    else:
        yield from pool.map(process_case, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
