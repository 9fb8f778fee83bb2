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
        reason = f"real data folder not found at {d} (set MEDFM_DATA)"
        # In CI a missing data folder is a setup error, not a reason to quietly skip the real-data tests.
        if os.environ.get("CI", "").lower() == "true" or os.environ.get("MEDFM_REQUIRE_DATA") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return d


@pytest.fixture(autouse=True, scope="session")
def _isolated_medfm_home(tmp_path_factory) -> None:
    """Keep the pseudonymisation salt and caches of test runs out of the user's ~/.medfm."""
    os.environ["MEDFM_HOME"] = str(tmp_path_factory.mktemp("medfm_home"))
