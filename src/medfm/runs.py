"""Run directories: the unit of exchange between medfm commands.

A run directory holds ``config.json`` (everything needed to rebuild and to reproduce), ``model.safetensors``
(the encoder alone, loadable with ``medfm.load_encoder``), ``metrics.json``, logs, plots and a ``README.md``
model card. Every command that trains writes one; every command that uses a model accepts one.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temporary file + rename), so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every run, for reproducibility."""
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def update_metrics(run_dir: str | Path, **metrics: Any) -> dict[str, Any]:
    """Merge values into run_dir/metrics.json (creating it)."""
    p = Path(run_dir) / "metrics.json"
    cur = read_json(p) if p.is_file() else {}
    cur.update(metrics)
    write_json(p, cur)
    return cur
