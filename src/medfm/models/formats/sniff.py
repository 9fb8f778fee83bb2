"""Cheap looks inside a weights file for format detection: key names without loading every tensor where the
format allows it (safetensors headers); torch files go through the weights-only reader."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from medfm.errors import MedfmError


@lru_cache(maxsize=16)
def _keys_cached(path: str, mtime: float) -> tuple[str, ...]:
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return tuple(f.keys())
        except Exception:  # not a safetensors file: a detector says "no"
            return ()
    from medfm.models.checkpoint import read_torch_weights

    try:
        obj = read_torch_weights(p)
    except MedfmError:
        return ()
    for key in ("model", "state_dict", "module"):  # training checkpoints wrap the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return tuple(str(k) for k in obj) if isinstance(obj, dict) else ()


def weight_keys(path: Path) -> list[str]:
    """The tensor names of a .safetensors / .pth / .pt / .bin file ([] when it is none of these)."""
    if not path.is_file() or path.suffix not in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        return []
    return list(_keys_cached(str(path), path.stat().st_mtime))


def read_config(path: Path, name: str = "config.json") -> dict | None:
    """A JSON config inside a folder (None when absent or unreadable)."""
    p = path / name if path.is_dir() else None
    if p is None or not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None
