"""Where medfm finds the shared real data (tests, benchmarks) and where it writes by default."""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path:
    """Real development data: $MEDFM_DATA, else ../shared/data relative to the repository."""
    env = os.environ.get("MEDFM_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path("../shared/data").resolve()
