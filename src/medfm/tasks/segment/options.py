"""Command-line options -> the segmentation configs, generically: every option named like a config field is
copied as is, so a new field needs no CLI glue and the CLI cannot drift from the library's defaults.

The CLI-only spellings live here too: ``--n-labels all``, ``--patch 96,96``, label lists ``1,2,5``, renamed
options (``--split`` of `segment train` is ``train_split``) and the encoder size overrides
(``--encoder-depth``, ``--patch-size``, ``--embed-dim``, ``--num-heads``; unset = the encoder's default),
which become ``encoder_kwargs``.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from medfm.errors import ConfigError
from medfm.tasks.segment.jobs import IncontextConfig, PromptTrainConfig
from medfm.tasks.segment.train import SegTrainConfig

C = TypeVar("C")

# CLI option -> encoder option; 0 / None leave the registry default
ENCODER_OVERRIDES = {"encoder_depth": "depth", "patch_size": "patch_size", "embed_dim": "embed_dim",
                     "num_heads": "num_heads"}


def from_options(cls: type[C], options: dict[str, Any], renamed: dict[str, str] | None = None) -> C:
    """``cls`` from the options named like its fields (``renamed``: option -> field); paths become strings
    (configs are saved as JSON) and the encoder size overrides become ``encoder_kwargs``."""
    opts = {(renamed or {}).get(k, k): v for k, v in options.items()}
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kw = {k: str(v) if isinstance(v, Path) else v for k, v in opts.items() if k in known}
    if "encoder_kwargs" in known:
        sizes = {k: v for k, v in opts.items() if k in ENCODER_OVERRIDES and v}
        kw["encoder_kwargs"] = {ENCODER_OVERRIDES[k]: v for k, v in sizes.items()}
    return cls(**kw)


def ints(v: str, name: str) -> list[int]:
    """``"1,2,5"`` -> [1, 2, 5]."""
    try:
        return [int(s) for s in v.split(",")]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers, got {v!r}") from None


def floats(v: str, n: int, name: str) -> list[float]:
    """Exactly ``n`` comma-separated numbers, e.g. a box ``x0,y0,x1,y1``."""
    try:
        vals = [float(s) for s in v.split(",")]
    except ValueError:
        vals = []
    if len(vals) != n:
        raise ConfigError(f"{name} needs {n} comma-separated numbers, got {v!r}")
    return vals


def _n_labels(v: str | None) -> int | None:
    if v in (None, "all"):
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"--n-labels must be an integer or 'all', got {v!r}") from None


def _patch(v: str | None) -> list[int] | None:
    if not v:
        return None
    try:
        return [int(s) for s in v.split(",")]
    except ValueError:
        raise ConfigError(f"--patch must look like 96,96 (or 64,64,64), got {v!r}") from None


def seg_train_config(options: dict[str, Any]) -> SegTrainConfig:
    """`medfm segment train` options -> SegTrainConfig."""
    opts = {**options, "n_labels": _n_labels(options.get("n_labels")), "patch": _patch(options.get("patch"))}
    return from_options(SegTrainConfig, opts, {"split": "train_split"})


def prompt_train_config(options: dict[str, Any]) -> PromptTrainConfig:
    """`medfm segment prompt-train` options -> PromptTrainConfig."""
    return from_options(PromptTrainConfig, options)


def incontext_config(options: dict[str, Any]) -> IncontextConfig:
    """`medfm segment incontext` training options -> IncontextConfig (``train_labels`` as ``"1,2,5"``)."""
    labels = options.get("train_labels")
    opts = {**options, "train_labels": ints(labels, "--train-labels") if labels else []}
    return from_options(IncontextConfig, opts)
