"""Shared fixtures: the real data folder and small deterministic settings for fast tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from medfm.paths import shared_data_dir

# Two cores: keep each test process to one intra-op thread so pytest-xdist workers don't fight.
torch.set_num_threads(1)
os.environ.setdefault("MEDFM_PROGRESS", "0")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"real data folder not found at {d} (set MEDFM_DATA)")
    return d


@pytest.fixture(autouse=True, scope="session")
def _isolated_medfm_home(tmp_path_factory) -> None:
    """Keep the pseudonymisation salt and caches of test runs out of the user's ~/.medfm."""
    os.environ["MEDFM_HOME"] = str(tmp_path_factory.mktemp("medfm_home"))
