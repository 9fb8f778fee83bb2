"""`medfm predict`: run a classifier, an encoder, a segmenter or an exported model over files, folders and
prepared datasets, into one results table.

OUT holds ``predictions.csv`` / ``.parquet`` (one row per case, in input order), ``embeddings.npy`` (encoders:
row i of the table is row i of the array), ``masks/`` (segmenters: one mask per case aligned with its input,
named by the case id; the table gives its path and per-class fractions / volumes), ``skipped.json`` (files
that could not be read, one-line reasons) and ``config.json`` / ``metrics.json`` (kind "predictions";
throughput in images/s). Every batch is written to ``OUT/partial/`` atomically, so rerunning the same command
after an interruption predicts only what is left.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medfm.data.identifiers import salt_dir
from medfm.errors import InputError
from medfm.predict.inputs import Case, Inputs, collect, read_case
from medfm.predict.masks import MASKS
from medfm.predict.model import Predictor, load_predictor
from medfm.rundir import RunDir, read_json, write_json

PARTIAL = "partial"
TABLE, EMBEDDINGS, SKIPPED = "predictions", "embeddings.npy", "skipped.json"


def _fingerprint(model: str | Path, cases: list[Case], salt: str | None, batch_size: int) -> str:
    """What a partial result belongs to: the model's files, the cases, the salt (not its value)."""
    h = hashlib.sha256()
    mp = Path(model).expanduser().absolute()
    for f in sorted(mp.rglob("*")) if mp.is_dir() else [mp]:
        if f.is_file() and PARTIAL not in f.parts:
            st = f.stat()
            h.update(f"{f.relative_to(mp) if mp.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(("keep" if salt is None else hashlib.sha256(("tag" + salt).encode()).hexdigest()).encode())
    h.update(str(batch_size).encode())
    for c in cases:
        h.update(c.key.encode() + b"\0")
    return h.hexdigest()[:16]


def _resume_state(part: Path, fp: str, resume: bool) -> list[int]:
    """Batch numbers already written by an interrupted run of the same job ([] starts afresh)."""
    state = part / "state.json"
    if resume and state.is_file() and read_json(state).get("fingerprint") == fp:
        return sorted(int(f.stem.split("-")[1]) for f in part.glob("batch-*.json"))
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    write_json(state, {"fingerprint": fp})
    return []


def _skip(c: Case, pos: int, e: InputError, ids: dict, keep: bool) -> dict[str, Any]:
    cid = ids.get(c.input)
    if cid is not None and not keep:  # the message loses its paths, like prepare's skipped list
        entry = cid.skipped(c.case_id, pos, str(e), c.ref, "")
        entry.pop("position", None)  # a place in the batch means nothing to the user
    else:
        entry = {"case_id": c.case_id, "error": str(e)}
    return {**entry, "input": c.input}


def _seg_batch(model: Predictor, cases: list[Case], ids: dict, keep: bool, out: Path, multi: bool
               ) -> tuple[list[dict[str, Any]], None, list[dict[str, Any]]]:
    """Rows (mask file, per-class fractions / volumes) and skipped entries of one batch of a segmenter;
    the masks are written (atomically) before the batch is marked done."""
    from medfm.predict import masks

    seg = model.seg or {}
    dims, k = int(seg["spatial_dims"]), int(seg["num_classes"])
    rows, skipped = [], []
    for pos, c in enumerate(cases):
        try:
            x, grid = masks.read_seg_case(c, model.spec, dims)
            labels = masks.segment(model.segmenter, seg, x, grid)
        except InputError as e:
            skipped.append(_skip(c, pos, e, ids, keep))
            continue
        rel = masks.write_mask(labels, grid, out, masks.mask_path(c, multi, dims))
        rows.append({"case_id": c.case_id, "input": c.input, "source": c.source, "mask": rel,
                     **masks.columns(labels, grid, model.classes, k)})
    return rows, None, skipped


def _run_batch(model: Predictor, cases: list[Case], ids: dict, keep: bool
               ) -> tuple[list[dict[str, Any]], np.ndarray | None, list[dict[str, Any]]]:
    """Rows, embeddings and skipped entries of one batch; unreadable cases are skipped, never fatal."""
    imgs: list[tuple[Case, torch.Tensor]] = []
    skipped: list[dict[str, Any]] = []
    for pos, c in enumerate(cases):
        try:
            imgs.append((c, read_case(c, model.spec)))
        except InputError as e:
            skipped.append(_skip(c, pos, e, ids, keep))
    rows: list[dict[str, Any]] = []
    embs: list[np.ndarray] = []
    # one forward per image shape (a batch may mix inputs prepared at different sizes)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for j, (_, t) in enumerate(imgs):
        by_shape.setdefault(tuple(t.shape), []).append(j)
    out: dict[int, tuple[dict[str, Any], np.ndarray | None]] = {}
    for idx in by_shape.values():
        probs, emb = model.infer(torch.stack([imgs[j][1] for j in idx]))
        cols = model.columns(probs) if probs is not None else {}
        for r, j in enumerate(idx):
            c = imgs[j][0]
            row = {"case_id": c.case_id, "input": c.input, "source": c.source}
            row.update({k: v[r].item() for k, v in cols.items()})
            out[j] = (row, None if emb is None else emb[r])
    for j in range(len(imgs)):
        rows.append(out[j][0])
        if out[j][1] is not None:
            embs.append(out[j][1])
    return rows, (np.stack(embs) if embs else None), skipped


def _write_batch(part: Path, b: int, rows: list[dict[str, Any]], emb: np.ndarray | None,
                 skipped: list[dict[str, Any]]) -> None:
    """One batch: embeddings first, the JSON (which marks the batch done) last, each atomic."""
    if emb is not None:
        tmp = part / f"emb-{b:06d}.tmp.npy"
        np.save(tmp, emb)
        tmp.replace(part / f"emb-{b:06d}.npy")
    write_json(part / f"batch-{b:06d}.json", {"rows": rows, "skipped": skipped})


def _bar(total: int, done: int, progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    if progress is None:  # a bar only on a terminal, and never with MEDFM_PROGRESS=0 (logs, tests)
        progress = sys.stderr.isatty() and os.environ.get("MEDFM_PROGRESS", "1") != "0"
    return tqdm(total=total, initial=done, unit="img", desc="predicting", disable=not progress, leave=False)


def _write_maps(inp: Inputs, out: Path, salt_file: str | None, fp: str) -> list[str]:
    names = []
    for k, ids in inp.ids.items():
        p = ids.write_map(salt_dir(salt_file), f"predict_{fp}_{k}", out)
        if p is not None:
            names.append(p.name)
    return names


def predict(run_or_export: str | Path, inputs: list[str | Path], out_dir: str | Path, batch_size: int = 32,
            salt_file: str | None = None, keep_identifiers: bool = False, resume: bool = True,
            progress: bool | None = None, variant: str = "fp32", threads: int = 0,
            fail_after_batches: int | None = None) -> dict[str, Any]:
    """Predict every case of ``inputs`` with a classifier/encoder/segmenter run or an export folder into OUT.

    Case ids are de-identified as in prepare (same salt: the same ids as the prepared twins; the private map
    goes beside the salt) unless ``keep_identifiers``. Returns the metrics (counts, images/s, files).
    ``fail_after_batches``: test hook, raise after that many new batches (an interrupted run).
    """
    from medfm.data.prepare_inputs import load_salt

    if batch_size < 1:
        raise InputError(None, f"--batch-size must be at least 1, got {batch_size}")
    if not inputs:
        raise InputError(None, "no inputs given")
    given = [Path(p).expanduser().absolute() for p in inputs]
    twice = next((p for k, p in enumerate(given) if p in given[:k]), None)
    if twice is not None:
        raise InputError(twice, "input given twice (its cases would be predicted twice)")
    model = load_predictor(run_or_export, variant=variant, threads=threads)
    salt = None if keep_identifiers else load_salt(salt_file)
    inp = collect(list(inputs), salt)
    out = Path(out_dir).expanduser()
    run = RunDir(out, "predictions")
    fp = _fingerprint(run_or_export, inp.cases, salt, batch_size)
    part = out / PARTIAL
    done = set(_resume_state(part, fp, resume))
    if model.source_kind == "segmenter" and not done:  # a fresh job: no masks of an earlier one stay behind
        shutil.rmtree(out / MASKS, ignore_errors=True)
    multi = len({c.input for c in inp.cases}) > 1
    batches = [inp.cases[i:i + batch_size] for i in range(0, len(inp.cases), batch_size)]
    n_new, new_batches, t0 = 0, 0, time.perf_counter()
    bar = _bar(len(inp.cases), sum(len(batches[b]) for b in done if b < len(batches)), progress)
    try:
        for b, cases in enumerate(batches):
            if b in done:
                continue
            if model.source_kind == "segmenter":
                rows, emb, skipped = _seg_batch(model, cases, inp.ids, keep_identifiers, out, multi)
            else:
                rows, emb, skipped = _run_batch(model, cases, inp.ids, keep_identifiers)
            _write_batch(part, b, rows, emb, skipped)
            n_new += len(rows)
            new_batches += 1
            bar.update(len(cases))
            if fail_after_batches is not None and new_batches >= fail_after_batches:
                raise RuntimeError(f"stopped after {new_batches} batches (fail_after_batches)")
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    return _finish(run, model, inp, part, len(batches), salt_file, fp, n_new, seconds, keep_identifiers,
                   batch_size)


def _finish(run: RunDir, model: Predictor, inp: Inputs, part: Path, n_batches: int, salt_file: str | None,
            fp: str, n_new: int, seconds: float, keep: bool, batch_size: int) -> dict[str, Any]:
    """Gather the batches into the final table, embeddings, skipped list, config and metrics."""
    rows: list[dict[str, Any]] = []
    skipped = list(inp.skipped)
    embs = []
    for b in range(n_batches):
        rec = read_json(part / f"batch-{b:06d}.json")
        rows += rec["rows"]
        skipped += rec["skipped"]
        if (part / f"emb-{b:06d}.npy").is_file():
            embs.append(np.load(part / f"emb-{b:06d}.npy"))
    df = pd.DataFrame(rows, columns=None if rows else ["case_id", "input", "source"])
    files = [f"{TABLE}.csv", f"{TABLE}.parquet", SKIPPED]
    if model.source_kind == "encoder":
        df["row"] = np.arange(len(df))
        dim = embs[0].shape[1] if embs else 0
        np.save(run.path / EMBEDDINGS, np.concatenate(embs) if embs else np.zeros((0, dim), np.float32))
        files.append(EMBEDDINGS)
    if model.source_kind == "segmenter":
        files.append(f"{MASKS}/")
    run.write_table(f"{TABLE}.csv", df)
    run.write_table(f"{TABLE}.parquet", df)
    run.write_json(SKIPPED, skipped)
    maps = _write_maps(inp, run.path, salt_file, fp)
    run.write_config({
        "model_kind": model.kind, "source_kind": model.source_kind, "task": model.task,
        "classes": model.classes, "threshold": model.threshold, "preprocessing": model.spec,
        **({"num_classes": (model.seg or {}).get("num_classes"), "masks": f"{MASKS}/ (PNG 2D at the input's "
            "H x W, NIfTI 3D with the input's affine; argmax of the logits)"}
           if model.source_kind == "segmenter" else {}),
        "n_inputs": len({c.input for c in inp.cases}), "batch_size": batch_size,
        "identifiers": "kept" if keep else "case ids and sources are salted hashes (map beside the salt)",
        "case_maps": maps, "fingerprint": fp, "files": files})
    rate = round(n_new / seconds, 2) if seconds > 0 else None
    metrics = {"n_cases": len(df), "n_skipped": len(skipped), "n_predicted_now": n_new,
               "seconds": round(seconds, 3), "images_per_s": rate}
    run.write_metrics(metrics, merge=False)
    shutil.rmtree(part, ignore_errors=True)
    return {**metrics, "out": str(run.path), "files": files}
