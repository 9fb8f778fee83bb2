"""`medfm data prepare`: any source -> a sharded, resized, normalised, de-identified dataset (see store.py).

Streaming design: the manifest (metadata only) is held in memory, images never are — cases are processed one
shard at a time (a process pool decodes in parallel), each shard is written atomically, recorded in
``progress.json``, and its rows saved to ``parts/``. A rerun of the same command skips recorded shards, so
an interrupted run resumes from the last complete shard and ends with byte-identical shards and manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medfm.data.identifiers import CaseIds, public_source, salt_dir
from medfm.data.manifest import NPZ_REF, Manifest
from medfm.data.preprocess import make_spec, modality_for, preprocess_sample
from medfm.data.store import FORMAT_VERSION, MANIFEST_COLUMNS, save_npy_atomic, shard_name, write_json_atomic
from medfm.errors import ConfigError, InputError, MedfmError

PROGRESS_FILE = "progress.json"


@dataclass
class PrepareConfig:
    """Settings of one prepare run (all of them except `workers` are part of the resume fingerprint)."""

    size: int = 224  # 2D: output is size x size
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
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("workers")
        d.pop("salt_file")  # the salt's *value* matters and is covered by the hashed IDs
        return d


# ------------------------------------------------------------------------------------------- reading
@lru_cache(maxsize=4)
def _npz_array(path: str, key: str) -> np.ndarray:
    with np.load(path) as z:
        return z[key]


def read_ref(ref: str) -> Any:
    """Read a manifest image reference: a file, a DICOM series folder, or ``file.npz::key/i`` -> Sample."""
    from medfm.data.sample import Sample

    file_part, sep, key = ref.partition(NPZ_REF)
    if sep and key.startswith("series/"):  # the k-th series (UID order) of a folder with several
        from medfm.data.read import read_series
        from medfm.data.readers.dicom_series import list_series

        uids = sorted(d["series_uid"] for d in list_series(file_part) if d["files"] > 1)
        k = int(key.split("/", 1)[1])
        if k >= len(uids):
            raise InputError(file_part, f"series {k} not found (folder has {len(uids)} multi-file series)")
        return read_series(file_part, series_uid=uids[k])
    if sep:
        name, _, idx = key.rpartition("/")
        arr = _npz_array(file_part, name)
        try:
            a = np.asarray(arr[int(idx)])
        except (IndexError, ValueError) as e:
            raise InputError(ref, f"no item {idx} in array {name}") from e
        # MedMNIST: (H, W), (H, W, 3) or (D, H, W) for the *3d subsets.
        if a.ndim == 3 and a.shape[-1] in (3, 4):  # (H, W, RGB); a volume never has 3 columns
            a = np.moveaxis(a, -1, 0)
        else:
            a = a[None]
        return Sample(array=a, spacing=(1.0,) * (a.ndim - 1), path=ref, meta={"format": "npz"})
    p = Path(ref)
    try:
        from medfm.data.read import read, read_series
    except ImportError:  # readers still being written: minimal fallback for pictures and NIfTI
        return _fallback_read(p)
    return read_series(p) if p.is_dir() else read(p)


def _fallback_read(p: Path) -> Any:
    from medfm.data.sample import Sample

    if p.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(p))
        a = np.asarray(img.dataobj).transpose(2, 1, 0)[None]
        zooms = img.header.get_zooms()[:3]
        return Sample(array=a, spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])), path=str(p))
    from PIL import Image

    with Image.open(p) as im:
        a = np.asarray(im)
    a = np.moveaxis(a, -1, 0) if a.ndim == 3 else a[None]
    return Sample(array=a, spacing=(1.0, 1.0), path=str(p))


# --------------------------------------------------------------------------------------------- worker
_SETTINGS: dict[str, Any] = {}


def _set_settings(settings: dict[str, Any]) -> None:
    _SETTINGS.clear()
    _SETTINGS.update(settings)


def _init_worker(settings: dict[str, Any]) -> None:
    """Initializer of a pool worker process (never call it in the main process: it pins threads)."""
    # One thread per worker: the pool is the parallelism; nested BLAS/torch threads only contend.
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    _set_settings(settings)


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
        mod = modality_for(sample, spec)
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


# ------------------------------------------------------------------------------------------- helpers
def load_salt(salt_file: str | Path | None) -> str:
    """The pseudonymisation salt: --salt-file, else ~/.medfm/.medfm_salt ($MEDFM_HOME overrides ~/.medfm).

    Kept outside the output so the hashes in a shared dataset cannot be reversed by trying IDs.
    """
    from medfm.data import deid

    if salt_file is None:
        home = Path(os.environ.get("MEDFM_HOME", Path.home() / ".medfm"))
        return deid.load_or_create_salt(home)
    p = Path(salt_file).expanduser()
    if p.is_file():
        salt = p.read_text().strip()
        if not re.fullmatch(r"[0-9a-f]{32,}", salt):
            raise InputError(p, "salt file is corrupt (expected at least 32 hex characters)")
        return salt
    p.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(16)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(salt + "\n")
    return salt


def _outside(m: Manifest, allow: list[str]) -> dict[str, str]:
    """case_id -> reason, for manifest rows whose image/mask lies outside the manifest folder and `allow`."""
    if not m.from_file:  # importers and folder scans build their own paths
        return {}
    roots = [os.path.normpath(os.path.abspath(m.root))]
    roots += [os.path.normpath(os.path.abspath(os.path.expanduser(a))) for a in allow]
    out = {}
    for cid, img, mask in zip(m.df["case_id"], m.df["image"], m.df["mask"]):
        for ref in (img, mask):
            p = os.path.normpath(str(ref).partition(NPZ_REF)[0]) if ref else ""
            if p and not any(p == r or p.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
                out[str(cid)] = (
                    f"{p}: outside the manifest's folder "
                    "(refused; --allow-outside PATH allows files under PATH)"
                )
                break
    return out


def _salt(cfg: PrepareConfig) -> str:
    return load_salt(cfg.salt_file)


def _progress_enabled(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return os.environ.get("MEDFM_PROGRESS", "1") != "0"


def _fingerprint(src: str, cfg: PrepareConfig, df: pd.DataFrame, salt_tag: str) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"src": src, "cfg": cfg.fingerprint_dict(), "salt": salt_tag}, sort_keys=True, default=str
        ).encode()
    )
    for row in df[["case_id", "image", "mask", "split", "patient_id"]].itertuples(index=False):
        h.update("\x1f".join(map(str, row)).encode())
    return h.hexdigest()[:24]


def _counts(df: pd.DataFrame, label_columns: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "split": {str(k): int(v) for k, v in df["split"].value_counts().sort_index().items()},
        "site": {str(k): int(v) for k, v in df["site"].value_counts().sort_index().items() if k != ""},
        "with_mask": int(df["has_mask"].sum()) if "has_mask" in df else 0,
        "with_report": int((df["report"].astype(str) != "").sum()),
        "label": {
            c: {str(k): int(v) for k, v in df[c].value_counts().sort_index().items()} for c in label_columns
        },
    }
    out["split_site"] = (
        {f"{a}/{b}": int(n) for (a, b), n in df.groupby(["split", "site"]).size().items()} if len(df) else {}
    )
    return out


def _jobs(rows: pd.DataFrame, modality: str | None) -> list[tuple[str, str, str]]:
    return [
        (str(r.image), str(r.mask), modality or "") for r in rows[["image", "mask"]].itertuples(index=False)
    ]


def _results(jobs: list, pool: ProcessPoolExecutor | None, workers: int) -> Iterator[dict[str, Any]]:
    """Results in job order; a pool decodes ahead within the shard (never beyond it)."""
    if pool is None:
        yield from map(process_case, jobs)
    else:
        yield from pool.map(process_case, jobs, chunksize=max(1, len(jobs) // (8 * workers)))


# ---------------------------------------------------------------------------------------------- main
def prepare(
    src: str | Path,
    out: str | Path,
    cfg: PrepareConfig | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    fail_after_shards: int | None = None,
) -> dict[str, Any]:
    """Prepare `src` (folder, manifest, or importer spec) into `out`; returns the summary dict.

    fail_after_shards: test hook — raise after writing that many new shards (simulates an interrupted run).
    """
    from medfm.data.importers import resolve_source
    from medfm.data.splits import leaking_groups, make_splits

    cfg = cfg or PrepareConfig()
    if cfg.size < 8 or cfg.shard_size < 1 or cfg.channels not in (1, 3):
        raise ConfigError("need --size >= 8, --shard-size >= 1 and --channels 1 or 3")
    t0 = time.perf_counter()
    out = Path(out)
    m: Manifest = resolve_source(src, label_cols=cfg.labels, modality=cfg.modality)
    df = m.df.copy()
    if len(df) == 0:
        raise InputError(src, "source has no cases")
    salt = None if cfg.keep_identifiers else load_salt(cfg.salt_file)
    ids = CaseIds(m.root, salt)
    orig = {c: (i, img, msk) for i, (c, img, msk) in enumerate(zip(df["case_id"], df["image"], df["mask"]))}
    df["case_id"] = [ids.case_id(c, img, msk) for c, img, msk in zip(df["case_id"], df["image"], df["mask"])]
    missing = dict(m.missing_files())
    missing.update(_outside(m, cfg.allow_outside))  # refused before anything opens the file
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
    fp = _fingerprint(str(src), cfg, df, salt_tag)

    # Resume bookkeeping.
    if out.exists() and overwrite:
        # Only ever delete what prepare wrote: a dataset (finished or not) or an empty folder.
        if not (
            (out / "summary.json").is_file() or (out / PROGRESS_FILE).is_file() or not any(out.iterdir())
        ):
            raise ConfigError(f"{out} is not a prepared dataset; refusing to delete it with --overwrite")
        shutil.rmtree(out)
    state: dict[str, Any] = {
        "fingerprint": fp,
        "done": {},
        "dims": None,
        "image_shape": None,
        "image_dtype": None,
    }
    summ = out / "summary.json"
    if summ.is_file():
        old = json.loads(summ.read_text())
        if old.get("fingerprint") == fp:
            return old  # same command already finished
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
        state = old
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; use another --out or --overwrite")
    out.mkdir(parents=True, exist_ok=True)

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
    n_shards = (len(df) + cfg.shard_size - 1) // cfg.shard_size
    pool = (
        ProcessPoolExecutor(cfg.workers, initializer=_init_worker, initargs=(settings,))
        if cfg.workers > 0
        else None
    )
    if pool is None:  # decode in this process: settings only, the caller's thread count stays
        _set_settings(settings)
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
            for (idx, row), res in zip(rows.iterrows(), _results(_jobs(rows, m.modality), pool, cfg.workers)):
                if bar is not None:
                    bar.advance(task)
                if res["ok"] and state["dims"] is not None and res["dims"] != state["dims"]:
                    res = {
                        "ok": False,
                        "error": f"{row['image']}: is {res['dims']}D but the dataset is "
                        f"{state['dims']}D (set by its first case)",
                    }
                if not res["ok"]:
                    shard_skipped.append(
                        ids.skipped(str(row["case_id"]), idx, res["error"], row["image"], row["mask"])
                    )
                    continue
                if state["dims"] is None:
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
                save_npy_atomic(out / "images" / shard_name(k), images[:n])
                if masks is not None:
                    save_npy_atomic(out / "masks" / shard_name(k), masks[:n])
            part = df.loc[keep].copy()
            part["shard"] = k
            part["index"] = np.arange(n)
            for key in ("has_mask", "orig_shape", "orig_spacing", "modality", "reader_notes", "from_dicom"):
                part[key] = [p[key] for p in prov]
            part["sex"] = [s or p["sex"] for s, p in zip(part["sex"], prov)]
            part["age"] = [a if a == a else p["age"] for a, p in zip(part["age"], prov)]  # a == a: not NaN
            part["source"] = [ids.source(v) for v in part["image"]]
            if n:
                (out / "parts").mkdir(exist_ok=True)
                tmp = out / "parts" / f"{k:05d}.parquet.tmp"
                part.to_parquet(tmp, index=False)
                os.replace(tmp, out / "parts" / f"{k:05d}.parquet")
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

    summary = _finalise(out, src, cfg, m, df, state, skipped, leaks, fp, time.perf_counter() - t0, settings)
    map_file = ids.write_map(salt_dir(cfg.salt_file), fp, out)
    if map_file is not None:  # in the returned dict only (for the user's terminal), never in summary.json
        summary["case_map_file"] = str(map_file)
    return summary


def _finalise(
    out: Path,
    src: str | Path,
    cfg: PrepareConfig,
    m: Manifest,
    df: pd.DataFrame,
    state: dict[str, Any],
    skipped: list[dict[str, str]],
    leaks: list[str],
    fp: str,
    seconds: float,
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Join the per-shard tables into manifest.parquet, write summary.json, drop the resume files."""
    parts = sorted((out / "parts").glob("*.parquet")) if (out / "parts").is_dir() else []
    man = (
        pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
        if parts
        else pd.DataFrame(columns=MANIFEST_COLUMNS)
    )
    for k in sorted(state["done"], key=int):
        skipped = skipped + state["done"][k]["skipped"]
    man = man.drop(columns=["image", "mask", "from_dicom"], errors="ignore")
    cols = (
        MANIFEST_COLUMNS
        + m.label_columns
        + [c for c in man.columns if c not in MANIFEST_COLUMNS and c not in m.label_columns]
    )
    man = man[[c for c in cols if c in man.columns]]
    tmp = out / "manifest.parquet.tmp"
    man.to_parquet(tmp, index=False)
    os.replace(tmp, out / "manifest.parquet")
    summary = {
        "format_version": FORMAT_VERSION,
        "n_cases": int(len(man)),
        "n_skipped": len(skipped),
        "spatial_dims": state["dims"],
        "image_shape": state["image_shape"],
        "image_dtype": state["image_dtype"],
        "n_shards": len(state["done"]),
        "shard_size": cfg.shard_size,
        "has_masks": bool(man["has_mask"].any()) if len(man) else False,
        "label_columns": m.label_columns,
        "task": m.task,
        "label_classes": m.label_classes,
        "mask_label_names": m.mask_label_names,
        "unlabelled_value": -1,
        "modality": m.modality or (sorted(man["modality"].unique().tolist()) if len(man) else None),
        "counts": _counts(man, m.label_columns) if len(man) else {},
        "skipped": skipped,
        "patient_leaks": leaks,
        "identifiers": "kept"
        if cfg.keep_identifiers
        else "patient/study/case IDs and source paths are salted hashes (salt and case map outside dataset)",
        "source": public_source(src, cfg.keep_identifiers, None if cfg.keep_identifiers else _salt(cfg)),
        "case_map": None if cfg.keep_identifiers else f"case_map_{fp}.json",  # beside the salt, private
        "settings": cfg.fingerprint_dict(),
        "preprocessing": spec,  # replayed on raw files at inference (medfm.data.preprocess.load_input)
        "fingerprint": fp,
        "seconds": round(seconds, 2),
        "cases_per_s": round(len(man) / seconds, 1) if seconds > 0 else None,
    }
    write_json_atomic(out / "summary.json", summary)
    shutil.rmtree(out / "parts", ignore_errors=True)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return summary
