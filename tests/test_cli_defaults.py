"""CLI defaults agree with the library, and the real-data fixture fails (not skips) in CI.

Each command is parsed with its required arguments only; every option that maps to a config field must give
that field's dataclass default, and an option that maps to no field must be one the test names."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import typer

from medfm.errors import ConfigError
from medfm.tasks.adapt import AdaptConfig
from medfm.tasks.segment.jobs import IncontextConfig, PromptTrainConfig
from medfm.tasks.segment.train import SegTrainConfig
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


def _command(*path: str) -> click.Command:
    from medfm.cli.app import app

    cmd: click.Command = typer.main.get_command(app)
    ctx = click.Context(cmd)
    for name in path:
        cmd = cmd.get_command(ctx, name)  # type: ignore[attr-defined]
    return cmd


def _parsed(path: tuple[str, ...], args: list[str]) -> dict[str, Any]:
    """The options of ``medfm PATH ARGS`` as the command receives them (no optional arg given: defaults)."""
    return dict(_command(*path).make_context(path[-1], list(args)).params)


def _pretrain_params(objective: str = "mae") -> dict[str, click.Parameter]:
    return {p.name: p for p in _command("pretrain", objective).params}


def test_pretrain_hardware_defaults_match_config():
    params = _pretrain_params()
    cfg = PretrainConfig(data=["x"], out="y")
    assert params["workers"].default == cfg.workers == 0
    assert params["threads"].default == cfg.threads == 0


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_clip_cli_defaults_build_the_default_config():
    from medfm.train.clip import ClipConfig, config_from_options

    opts = _parsed(("clip",), ["pairs", "--out", "run"])
    # every option is a ClipConfig field, a renamed one or an encoder shortcut folded into encoder_kwargs
    assert set(opts) - _field_names(ClipConfig) == {"grad_cache", "patch_size", "depth", "encoder_args"}
    assert config_from_options(opts) == ClipConfig(data="pairs", out="run")


# (command, required args, converter name, config factory, CLI options that are no config field)
_SEGMENT = [
    (("segment", "train"), [], "seg_train_config", lambda: SegTrainConfig(data="d"),
     {"out", "split", "encoder_depth"}),
    (("segment", "prompt-train"), [], "prompt_train_config", lambda: PromptTrainConfig(data="d"),
     {"out", "encoder_depth"}),
    (("segment", "incontext"), ["--train-labels", "1,2"], "incontext_config",
     lambda: IncontextConfig(data="d", train_labels=[1, 2]),
     {"out", "run", "test_labels", "k", "encoder_depth", "patch_size", "embed_dim", "num_heads"}),
]


@pytest.mark.parametrize("path, args, convert, default, cli_only", _SEGMENT, ids=[c[0][1] for c in _SEGMENT])
def test_segment_cli_defaults_build_the_default_config(path, args, convert, default, cli_only):
    from medfm.tasks.segment import options

    opts = _parsed(path, ["d", "--out", "o", *args])
    cfg = default()
    assert set(opts) - _field_names(type(cfg)) == cli_only
    assert getattr(options, convert)(opts) == cfg


def test_segment_cli_spellings_reach_the_config():
    from medfm.tasks.segment.options import incontext_config, seg_train_config

    opts = _parsed(("segment", "train"), ["d", "-o", "o", "--n-labels", "10", "--patch", "96,96",
                                          "--encoder-depth", "2", "--split", "val", "--no-flip"])
    cfg = seg_train_config(opts)
    assert (cfg.n_labels, cfg.patch, cfg.encoder_kwargs, cfg.train_split, cfg.flip) == (
        10, [96, 96], {"depth": 2}, "val", False)
    opts = _parsed(("segment", "incontext"), ["d", "-o", "o", "--train-labels", "1,3", "--patch-size", "8",
                                              "--embed-dim", "96", "--prior", "prototype"])
    cfg = incontext_config(opts)
    assert (cfg.train_labels, cfg.encoder_kwargs, cfg.prior) == ([1, 3], {"patch_size": 8, "embed_dim": 96},
                                                                 "prototype")
    for bad, name in ((["--n-labels", "ten"], "--n-labels"), (["--patch", "96x96"], "--patch")):
        with pytest.raises(ConfigError, match=name):
            seg_train_config(_parsed(("segment", "train"), ["d", "-o", "o", *bad]))


def _compare(opts: dict[str, Any], cfg: Any, renamed: dict[str, str], convert: dict[str, Any]) -> list[str]:
    """Each option named like a field of ``cfg`` (after ``renamed``), converted from its CLI spelling, against
    that field's default; returns the mismatches as readable lines."""
    bad = []
    for name, value in opts.items():
        field = renamed.get(name, name)
        if field not in _field_names(type(cfg)):
            continue
        got = convert.get(name, lambda v: v)(value)
        if got != getattr(cfg, field):
            want = getattr(cfg, field)
            bad.append(f"--{name.replace('_', '-')} {value!r} -> {field}={got!r}, config has {want!r}")
    return bad


def _floats(v: str) -> tuple[float, ...]:
    return tuple(float(x) for x in v.split(","))


def test_prepare_cli_defaults_match_prepare_config():
    from medfm.data.prepare import PrepareConfig

    opts = _parsed(("data", "prepare"), ["src", "--out", "o"])
    renamed = {"resize": "resize_mode", "split": "fractions"}
    convert = {
        "spacing": _floats, "window": _floats, "split": _floats,
        "volume_shape": lambda v: tuple(int(x) for x in _floats(v)),
        "labels": lambda v: [c.strip() for c in v.split(",") if c.strip()] or None,
        "allow_outside": list,
    }
    compared = {renamed.get(n, n) for n in opts} & _field_names(PrepareConfig)
    assert set(opts) - {*renamed, *compared} == {"src", "out", "overwrite", "strict"}
    assert _compare(opts, PrepareConfig(), renamed, convert) == []


_ADAPT_RENAMED = {"k": "knn_k", "method": "methods"}
# fractions + shots make the budgets; the rest drive the command, not the experiment
_ADAPT_CLI_ONLY = {"model", "data", "out", "fractions", "shots", "report", "threads"}


def _adapt_opts() -> dict[str, Any]:
    opts = _parsed(("adapt",), ["model", "data", "--out", "o"])
    compared = {_ADAPT_RENAMED.get(n, n) for n in opts} & _field_names(AdaptConfig)
    assert set(opts) - {*_ADAPT_RENAMED, *compared} == _ADAPT_CLI_ONLY
    return opts


def test_adapt_cli_defaults_match_adapt_config():
    opts = _adapt_opts()
    convert = {"method": lambda v: [m.strip() for m in v.split(",") if m.strip()]}
    assert _compare(opts, AdaptConfig(), _ADAPT_RENAMED, convert) == []


def test_adapt_budgets_and_saving_match_the_library():
    from medfm.tasks.adapt import parse_budgets

    opts = _adapt_opts()
    assert parse_budgets(opts["fractions"], opts["shots"]) == AdaptConfig().budgets
    assert opts["save_model"] == AdaptConfig().save_model


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
