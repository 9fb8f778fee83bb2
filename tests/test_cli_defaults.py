"""CLI defaults agree with the library, and the real-data fixture fails (not skips) in CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from medfm.errors import ConfigError
from medfm.train.config import PretrainConfig

_TESTS = Path(__file__).parent


def _run_fixture_probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run a one-test file that asks for `data_dir`, with this conftest, in a fresh pytest."""
    shutil.copy(_TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text("def test_needs_data(data_dir):\n    assert data_dir.is_dir()\n")
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "MEDFM_REQUIRE_DATA")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**base, "MEDFM_DATA": "/nonexistent/medfm-data", **env},
    )


@pytest.mark.parametrize("env", [{"CI": "true"}, {"MEDFM_REQUIRE_DATA": "1"}])
def test_missing_data_fails_in_ci(tmp_path, env):
    r = _run_fixture_probe(tmp_path, **env)
    assert r.returncode != 0, r.stdout
    assert "1 error" in r.stdout or "1 failed" in r.stdout, r.stdout
    assert "real data folder not found at /nonexistent/medfm-data" in r.stdout


def test_missing_data_skips_outside_ci(tmp_path):
    r = _run_fixture_probe(tmp_path)
    assert r.returncode == 0, r.stdout
    assert "1 skipped" in r.stdout
    assert "real data folder not found at /nonexistent/medfm-data" in r.stdout


def _pretrain_params(objective: str = "mae") -> dict[str, click.Parameter]:
    from medfm.cli.app import app

    group = typer.main.get_command(app)
    ctx = click.Context(group)
    cmd = group.get_command(ctx, "pretrain").get_command(ctx, objective)
    return {p.name: p for p in cmd.params}


def test_pretrain_hardware_defaults_match_config():
    params = _pretrain_params()
    cfg = PretrainConfig(data=["x"], out="y")
    assert params["workers"].default == cfg.workers == 0
    assert params["threads"].default == cfg.threads == 0


def test_negative_threads_is_a_config_error():
    with pytest.raises(ConfigError, match="--threads"):
        PretrainConfig(data=["x"], out="y", threads=-1)


def test_cli_quiets_library_adverts_and_future_warnings():
    import logging
    import warnings

    from medfm.cli.app import quiet_libraries

    tip = logging.getLogger("lightning.pytorch.trainer.connectors.logger_connector.logger_connector")
    old = logging.getLogger("lightning.pytorch.trainer.connectors").level
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            quiet_libraries()
            for mod in ("monai.utils.deprecate_utils", "lightning.pytorch.trainer", "medfm.train"):
                warnings.warn_explicit(f"from {mod}", FutureWarning, "x.py", 1, module=mod)
        assert [str(w.message) for w in seen] == ["from medfm.train"]  # our own still show
        assert not tip.isEnabledFor(logging.INFO) and tip.isEnabledFor(logging.WARNING)
    finally:
        logging.getLogger("lightning.pytorch.trainer.connectors").setLevel(old)
