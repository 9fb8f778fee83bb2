"""The input side of `medfm predict`: files, folders, manifests and prepared datasets -> one list of cases.

Raw files are found the way `prepare` finds them (`resolve_source`: folder scan, DICOM series, NIfTI, npz,
manifests) and get the case ids prepare would give them (`CaseIds` with the same salt), so a prediction can
be joined to the prepared twin of its image. A prepared dataset keeps its own (already public) case ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfm.data.identifiers import CaseIds
from medfm.errors import InputError

SUMMARY = "summary.json"


@dataclass
class Case:
    """One image to predict: read from ``ref`` (raw file) or from row ``index`` of prepared ``store``."""

    input: int  # position of its input argument
    case_id: str  # public id (salted hash unless identifiers are kept)
    source: str  # provenance as prepare records it (hashed path, or the path with --keep-identifiers)
    ref: str = ""
    modality: str = ""
    store: Any = None  # a PreparedDataset
    index: int = -1

    @property
    def key(self) -> str:
        """Unique across inputs (two folders may both hold img001.png)."""
        return f"{self.input}:{self.case_id}"


@dataclass
class Inputs:
    cases: list[Case]
    skipped: list[dict[str, Any]]  # inputs' bad rows, paths removed unless identifiers are kept
    ids: dict[int, CaseIds]  # per input (raw files only): the private map back to the files


def _strip_ext(name: str) -> str:
    for ext in (".nii.gz", ".nii", ".npz", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _store_cases(k: int, root: Path, keep: bool) -> list[Case]:
    from medfm.data.store import PreparedDataset

    ds = PreparedDataset(root)
    m = ds.manifest
    src = m["source"].astype(str).tolist() if "source" in m.columns else [""] * len(m)
    return [Case(k, str(cid), (f"{root}#{cid}" if keep else s), store=ds, index=i)
            for i, (cid, s) in enumerate(zip(m["case_id"].astype(str), src))]


def _raw_cases(k: int, p: Path, salt: str | None) -> tuple[list[Case], list[dict[str, Any]], CaseIds]:
    from medfm.data.importers import resolve_source

    if p.is_file() and p.suffix.lower() not in (".csv", ".tsv", ".parquet"):
        ids = CaseIds(p.parent, salt)  # one file: named relative to its folder, like a scan of that folder
        ref = str(p)
        return [Case(k, ids.case_id(_strip_ext(p.name), ref, ""), ids.source(ref), ref)], [], ids
    m = resolve_source(p)
    ids = CaseIds(m.root, salt)
    cases = [Case(k, ids.case_id(str(cid), str(img), ""), ids.source(str(img)), str(img), m.modality or "")
             for cid, img in zip(m.df["case_id"], m.df["image"])]
    skipped = [dict(ids.bad_row(e), input=k) for e in m.bad_rows]
    return cases, skipped, ids


def collect(inputs: list[str | Path], salt: str | None) -> Inputs:
    """Every case of ``inputs`` (salt None: identifiers kept). A missing input is an error, not a skip."""
    out = Inputs([], [], {})
    for k, raw in enumerate(inputs):
        p = Path(raw).expanduser().absolute()
        if not p.exists():
            raise InputError(p, "input not found (a file, a folder, a manifest or a prepared dataset)")
        if p.is_dir() and (p / SUMMARY).is_file():
            out.cases += _store_cases(k, p, salt is None)
            continue
        cases, skipped, ids = _raw_cases(k, p, salt)
        out.cases += cases
        out.skipped += skipped
        out.ids[k] = ids
    return out


def read_case(case: Case, spec: dict[str, Any]) -> torch.Tensor:
    """The image as the model sees it: prepare's stored array (a store) or its replay (`load_input`)."""
    from medfm.data.preprocess import load_input, to_tensor

    if case.store is not None:
        try:
            return to_tensor(np.asarray(case.store.image_array(case.index)))
        except (ValueError, OSError) as e:  # a damaged shard; the message names no folder of the user's
            why = f"case {case.case_id}: stored image unreadable ({type(e).__name__})"
            raise InputError(None, why) from None
    spec = dict(spec, modality=case.modality or spec.get("modality"))
    try:
        return load_input(case.ref, spec)
    except InputError:
        raise
    except (ValueError, OSError, RuntimeError) as e:  # decoders' own errors: one line naming the file
        raise InputError(case.ref, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
