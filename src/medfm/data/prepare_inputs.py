"""Checks and keys of `prepare` besides decoding: salt, confinement, fingerprint, the 2D/3D mix message."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from medfm.data.identifiers import salt_dir
from medfm.data.manifest import NPZ_REF, Manifest


def load_salt(salt_file: str | Path | None) -> str:
    """The pseudonymisation salt: --salt-file, else ~/.medfm/.medfm_salt ($MEDFM_HOME overrides ~/.medfm).

    Kept outside the output so the hashes in a shared dataset cannot be reversed by trying IDs.
    """
    from medfm.data import deid

    if salt_file is None:
        return deid.load_or_create_salt(salt_dir(None))
    return deid.load_or_create_salt_file(Path(salt_file).expanduser())


def outside_rows(m: Manifest, allow: list[str]) -> dict[str, str]:
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


def fingerprint(src: str, settings: dict[str, Any], df: pd.DataFrame, salt_tag: str) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"src": src, "cfg": settings, "salt": salt_tag}, sort_keys=True, default=str
        ).encode()
    )
    for row in df[["case_id", "image", "mask", "split", "patient_id"]].itertuples(index=False):
        h.update("\x1f".join(map(str, row)).encode())
    return h.hexdigest()[:24]


def kind_name(dims: int, n: int) -> str:
    return f"{n} {dims}D " + (("image" if dims == 2 else "volume") + ("s" if n != 1 else ""))


def mixed_message(counts: dict[int, int]) -> str:
    """The refusal of a source with both 2D and 3D cases, naming the counts (see count_dims)."""
    kinds = " and ".join(kind_name(d, counts[d]) for d in sorted(counts))
    return f"input mixes {kinds}; prepare them separately (--dims 2 or --dims 3 keeps one kind)"



def count_dims(refs: list[str], decoded: dict[int, int]) -> dict[int, int]:
    """Cases per spatial dimensionality, from headers (no pixel decoding), for the mixed-input refusal.

    Called once decoding has proved the mix (two good cases of different kinds: a bad file never decides a
    refusal), so the user learns the counts without waiting for every case to decode. `decoded` holds the
    kinds seen so far; references whose header cannot be read (npz items among them) are not counted.
    """
    from medfm.data.read import probe

    counts: dict[int, int] = {}
    for ref in refs:
        if NPZ_REF in ref:
            continue
        try:
            dims = len(probe(ref)["shape"]) - 1  # channel-first shape
        except Exception:  # noqa: BLE001 - an unreadable header is simply not counted
            continue
        if dims in (2, 3):
            counts[dims] = counts.get(dims, 0) + 1
    return {d: max(counts.get(d, 0), n) for d, n in {**counts, **decoded}.items()}
