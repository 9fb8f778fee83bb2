"""`medfm data prepare`: any source -> a sharded, resized, normalised, de-identified dataset (see store.py).

Streaming design: the manifest (metadata only) is held in memory, images never are — cases are processed one
shard at a time (a process pool decodes in parallel, prepare_worker.py), each shard is written atomically,
recorded in ``progress.json``, and its rows saved to ``parts/``. A rerun of the same command skips recorded
shards, so an interrupted run resumes from the last complete shard and ends with byte-identical shards and
manifest. The checks made before decoding are in prepare_inputs.py, the final manifest and summary.json
in prepare_finalise.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfm.data.identifiers import CaseIds, salt_dir
from medfm.data.labels import drop_bad_labels
from medfm.data.manifest import Manifest
from medfm.data.prepare_finalise import PROGRESS_FILE, finalise
from medfm.data.prepare_inputs import count_dims, fingerprint, load_salt, mixed_message, outside_rows
from medfm.data.prepare_worker import case_jobs, decode, init_worker, process_case, set_settings
from medfm.data.preprocess import make_spec
from medfm.data.refs import read_ref
from medfm.data.store_writer import StoreWriter, write_json_atomic
from medfm.data.summary import SUMMARY_FILE, load_summary
from medfm.errors import ConfigError, InputError

__all__ = ["PROGRESS_FILE", "PrepareConfig", "load_salt", "prepare", "process_case", "read_ref"]


@dataclass
class PrepareConfig:
    """Settings of one prepare run (all of them except `workers` are part of the resume fingerprint)."""

    size: int | None = None  # 2D: size x size; None: a MedMNIST file's own size, else 224
    resize_mode: str = "pad"  # pad (keep all, letterbox) | crop | stretch
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)  # 3D target spacing in mm, (z, y, x)
    volume_shape: tuple[int, int, int] = (96, 96, 96)  # 3D output (D, H, W) after crop/pad
    modality: str = "auto"  # auto | xray | ct | mr | us | other
    window: tuple[float, float] = (-1000.0, 1000.0)  # CT HU window
    labels: list[str] | None = None
    shard_size: int = 1024
    channels: int = 1
    dtype: str = "auto"  # auto (uint8 2D, float16 3D) | uint8 | float16
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0
    keep_identifiers: bool = False
    salt_file: str | None = None
    workers: int = 0  # 0: decode in this process
    allow_outside: list[str] = field(default_factory=list)  # roots a manifest may point into besides its own
    dims: int | None = None  # 2 or 3: keep only cases of that kind (others skipped); None: refuse a mix
    drop_bad_labels: bool = False  # skip rows with stray label values instead of refusing the manifest
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("workers")
        d.pop("salt_file")  # the salt's *value* matters and is covered by the hashed IDs
        # Options added later count only when set, so stores prepared before them still resume/re-run.
        for key, default in (("dims", None), ("drop_bad_labels", False)):
            if d[key] == default:
                d.pop(key)
        return d

    def check(self) -> None:
        if (self.size is not None and self.size < 8) or self.shard_size < 1 or self.channels not in (1, 3):
            raise ConfigError("need --size >= 8, --shard-size >= 1 and --channels 1 or 3")
        if self.dims not in (None, 2, 3):
            raise ConfigError(f"--dims must be 2 or 3, not {self.dims}")


def _progress_enabled(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return os.environ.get("MEDFM_PROGRESS", "1") != "0"


def _open_output(out: Path, fp: str, overwrite: bool, dims: int | None) -> dict[str, Any] | None:
    """The resume state for `out` (new, or an unfinished run of the same command); None: already done."""
    if out.exists() and overwrite:
        # Only ever delete what prepare wrote: a dataset (finished or not) or an empty folder.
        if not ((out / SUMMARY_FILE).is_file() or (out / PROGRESS_FILE).is_file() or not any(out.iterdir())):
            raise ConfigError(f"{out} is not a prepared dataset; refusing to delete it with --overwrite")
        shutil.rmtree(out)
    if (out / SUMMARY_FILE).is_file():
        if load_summary(out).fingerprint == fp:
            return None  # same command already finished
        raise ConfigError(
            f"{out} already holds a prepared dataset from different settings or source; "
            "use another --out or --overwrite"
        )
    if (out / PROGRESS_FILE).is_file():
        old = json.loads((out / PROGRESS_FILE).read_text())
        if old.get("fingerprint") != fp:
            raise ConfigError(
                f"{out} holds an unfinished prepare run with different settings or source; "
                "rerun that exact command to resume, or use --overwrite"
            )
        return old
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; use another --out or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return {"fingerprint": fp, "done": {}, "dims": dims, "image_shape": None, "image_dtype": None}


def _discard(out: Path) -> None:
    """Remove what this run wrote (shards, parts, progress) after a refusal found while decoding."""
    for name in ("images", "masks", "parts"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / PROGRESS_FILE).unlink(missing_ok=True)


class _MixedDims(Exception):
    """Decoding met a case of the other spatial dimensionality (without --dims)."""

    def __init__(self, seen: dict[int, int]) -> None:
        self.seen = seen


def prepare(
    src: str | Path,
    out: str | Path,
    cfg: PrepareConfig | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    fail_after_shards: int | None = None,
) -> dict[str, Any]:
    """Prepare `src` (folder, manifest, or importer spec) into `out`; returns the summary dict.

    A run in which every case is bad still writes summary.json (n_cases 0, the skipped list); the CLI
    then exits non-zero. A source mixing 2D and 3D cases is refused (with the counts of each, and nothing
    left in `out`) unless ``cfg.dims`` keeps one kind and lists the others as skipped.
    fail_after_shards: test hook — raise after writing that many new shards (simulates an interrupted run).
    """
    from medfm.data.importers import default_size, resolve_source
    from medfm.data.splits import leaking_groups, make_splits

    cfg = cfg or PrepareConfig()
    cfg.check()
    t0 = time.perf_counter()
    out = Path(out)
    with drop_bad_labels(cfg.drop_bad_labels):
        m: Manifest = resolve_source(src, label_cols=cfg.labels, modality=cfg.modality)
    if cfg.size is None:  # before the fingerprint: a resumed run resolves the same size
        cfg = replace(cfg, size=default_size(m))
    df = m.df.copy()
    if len(df) == 0 and not m.bad_rows:
        raise InputError(src, "source has no cases")
    salt = None if cfg.keep_identifiers else load_salt(cfg.salt_file)
    ids = CaseIds(m.root, salt)
    orig = {c: (i, img, msk) for i, (c, img, msk) in enumerate(zip(df["case_id"], df["image"], df["mask"]))}
    df["case_id"] = [ids.case_id(c, img, msk) for c, img, msk in zip(df["case_id"], df["image"], df["mask"])]
    missing = dict(m.missing_files())
    missing.update(outside_rows(m, cfg.allow_outside))  # refused before anything opens the file
    skipped = [
        ids.skipped(pub, orig[c][0], missing[c], orig[c][1], orig[c][2])
        for c, pub in zip(m.df["case_id"], df["case_id"])
        if c in missing
    ]
    df = df[~m.df["case_id"].isin(set(missing)).to_numpy()].reset_index(drop=True)
    skipped = [ids.bad_row(b) for b in m.bad_rows] + skipped
    df["split"] = make_splits(
        df,
        cfg.fractions,
        seed=cfg.seed,
        group="patient_id",
        stratify=m.label_columns[0] if m.label_columns and m.task != "multilabel" else None,
    )
    leaks = leaking_groups(df)
    salt_tag = "keep"
    if salt is not None:
        from medfm.data.deid import hash_id

        salt_tag = hashlib.sha256(("tag" + salt).encode()).hexdigest()[:12]
        for col, prefix in (("patient_id", "p_"), ("study_id", "st_")):
            df[col] = [hash_id(v, salt, prefix) if v else "" for v in df[col]]
        leaks = [hash_id(v, salt) for v in leaks]
    fp = fingerprint(str(src), cfg.fingerprint_dict(), df, salt_tag)
    state = _open_output(out, fp, overwrite, cfg.dims)
    if state is None:
        return load_summary(out).to_dict()

    settings = make_spec(
        size=cfg.size,
        resize_mode=cfg.resize_mode,
        spacing=tuple(cfg.spacing),
        volume_shape=tuple(cfg.volume_shape),
        window=tuple(cfg.window),
        channels=cfg.channels,
        dtype=cfg.dtype,
        modality=m.modality or None,
        mask_labels=m.mask_labels,
    )
    try:
        _write_shards(out, df, m, cfg, ids, state, settings, progress, fail_after_shards)
    except _MixedDims as e:
        _discard(out)
        raise InputError(src, mixed_message(count_dims([str(v) for v in df["image"]], e.seen))) from None
    summary = finalise(
        out, src, cfg, m, state, skipped, leaks, fp, time.perf_counter() - t0, settings, salt
    ).to_dict()
    map_file = ids.write_map(salt_dir(cfg.salt_file), fp, out)
    if map_file is not None:  # in the returned dict only (for the user's terminal), never in summary.json
        summary["case_map_file"] = str(map_file)
    return summary


def _write_shards(
    out: Path,
    df: pd.DataFrame,
    m: Manifest,
    cfg: PrepareConfig,
    ids: CaseIds,
    state: dict[str, Any],
    settings: dict[str, Any],
    progress: bool | None,
    fail_after_shards: int | None,
) -> None:
    """Decode and write every shard not yet recorded in `state` (updated, and saved after each shard)."""
    writer = StoreWriter(out)
    n_shards = (len(df) + cfg.shard_size - 1) // cfg.shard_size
    pool = (
        ProcessPoolExecutor(cfg.workers, initializer=init_worker, initargs=(settings,))
        if cfg.workers > 0
        else None
    )
    if pool is None:  # decode in this process: settings only, the caller's thread count stays
        set_settings(settings)
    new_shards = 0
    bar = None
    if _progress_enabled(progress):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        bar.start()
        task = bar.add_task("preparing", total=len(df))
        bar.update(task, completed=sum(v["n_rows"] for v in state["done"].values()))
    try:
        for k in range(n_shards):
            if str(k) in state["done"]:
                continue
            rows = df.iloc[k * cfg.shard_size : (k + 1) * cfg.shard_size]
            images: np.ndarray | None = None
            masks: np.ndarray | None = None
            keep, prov, shard_skipped = [], [], []
            decoded = decode(case_jobs(rows, m.modality), pool, cfg.workers)
            for (idx, row), res in zip(rows.iterrows(), decoded):
                if bar is not None:
                    bar.advance(task)
                if res["ok"] and state["dims"] is not None and res["dims"] != state["dims"]:
                    if cfg.dims is None:  # a mix: refused whatever the order of the files
                        raise _MixedDims({state["dims"]: 1, res["dims"]: 1})
                    why = f"(--dims {cfg.dims} keeps only {cfg.dims}D cases)"
                    res = {"ok": False, "error": f"{row['image']}: is {res['dims']}D {why}"}
                if not res["ok"]:
                    shard_skipped.append(
                        ids.skipped(str(row["case_id"]), idx, res["error"], row["image"], row["mask"])
                    )
                    continue
                if state["image_shape"] is None:
                    state["dims"] = res["dims"]
                    state["image_shape"] = list(res["image"].shape)
                    state["image_dtype"] = str(res["image"].dtype)
                if images is None:
                    images = np.empty((len(rows), *state["image_shape"]), dtype=state["image_dtype"])
                images[len(keep)] = res["image"]
                if res["mask"] is not None:
                    if masks is None:
                        masks = np.zeros((len(rows), *state["image_shape"][1:]), dtype=np.uint8)
                    masks[len(keep)] = res["mask"]
                keep.append(idx)
                prov.append(
                    {
                        "sex": res["sex"],
                        "age": res["age"],
                        "has_mask": res["mask"] is not None,
                        "orig_shape": res["orig_shape"],
                        "orig_spacing": res["orig_spacing"],
                        "modality": res["modality"],
                        "reader_notes": ids.text(res["reader_notes"], row["image"], row["mask"]),
                        "from_dicom": res["from_dicom"],
                    }
                )
            n = len(keep)
            if n:
                writer.write_shard(k, images[:n], None if masks is None else masks[:n])
            part = df.loc[keep].copy()
            part["shard"] = k
            part["index"] = np.arange(n)
            for key in ("has_mask", "orig_shape", "orig_spacing", "modality", "reader_notes", "from_dicom"):
                part[key] = [p[key] for p in prov]
            part["sex"] = [s or p["sex"] for s, p in zip(part["sex"], prov)]
            part["age"] = [a if a == a else p["age"] for a, p in zip(part["age"], prov)]  # a == a: not NaN
            part["source"] = [ids.source(v) for v in part["image"]]
            if n:
                writer.write_part(k, part)
            state["done"][str(k)] = {"n_rows": int(len(rows)), "n_kept": n, "skipped": shard_skipped}
            write_json_atomic(out / PROGRESS_FILE, state)  # the shard counts as done only from here on
            del images, masks, part
            new_shards += 1
            if fail_after_shards is not None and new_shards >= fail_after_shards:
                raise RuntimeError(f"test hook: stopped after {new_shards} shard(s)")
    finally:
        if bar is not None:
            bar.stop()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
