"""Run directories: the unit of exchange between medfm commands, written and read in one way.

A run directory holds ``config.json`` (everything needed to rebuild and to reproduce, plus ``kind`` and
``format_version``), weights (``*.safetensors``), ``metrics.json``, plots, logs and a ``README.md`` model
card.
Every command that trains writes one through :class:`RunDir`; :func:`load_run` turns one back into the right
object by its kind. Every file is written atomically (temporary file + ``os.replace``), so a crash mid-write
leaves the previous version, never half a file.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medfm.errors import InputError

FORMAT_VERSION = 2
CONFIG, METRICS, CARD = "config.json", "metrics.json", "README.md"

# kind -> "module:function" that loads such a run. Strings, imported on use: this module stays importable by
# every writer without pulling in model code (and without import cycles).
LOADERS: dict[str, str] = {
    "encoder": "medfm.models.io:load_encoder",
    "clip": "medfm.models.clip:load_clip",
    "classifier": "medfm.tasks.adapt.classifier:load_classifier",
    "adapt": "medfm.rundir:load_adapt_results",
    "segmenter": "medfm.tasks.segment.runs:load_segmenter",
    "promptable": "medfm.tasks.segment.runs:load_promptable",
    "incontext": "medfm.tasks.segment.runs:load_incontext",
    "audit": "medfm.audit.run:load_audit",
    "export": "medfm.export.session:load_exported",
}
# What runs written before format version 2 call themselves ('kind' of pretraining, 'task' of segmentation).
LEGACY_KINDS = {"pretrain": "encoder", "segment": "segmenter", "segment_prompt": "promptable",
                "segment_incontext": "incontext"}


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy arrays / scalars, tensors
        return o.tolist()
    return str(o)


def _atomic_write(path: Path, data: bytes) -> Path:
    """Write bytes to path via a temporary file in the same folder + rename (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically, so readers never see half a file."""
    return _atomic_write(Path(path), json.dumps(obj, indent=2, default=_json_default).encode())


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a broken one is an InputError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON ({e.msg} at line {e.lineno})") from None


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every run, for reproducibility."""
    import torch

    from medfm import __version__

    return {
        "medfm": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def infer_kind(config: dict[str, Any]) -> str | None:
    """The kind of a run from its config, including configs written before format version 2."""
    kind = config.get("kind")
    if kind:
        return LEGACY_KINDS.get(kind, kind)
    return LEGACY_KINDS.get(config.get("task"))  # old segmentation runs: 'task' named the run type


class RunDir:
    """One run directory: config.json, weights (*.safetensors), metrics.json, README.md card, plots, logs."""

    def __init__(self, path: str | Path, kind: str | None = None) -> None:
        self.path = Path(path).expanduser()
        self._kind = kind

    @property
    def kind(self) -> str:
        """The run's kind: given when writing, else read from config.json."""
        if self._kind is None:
            kind = infer_kind(self.config())
            if kind is None:
                raise InputError(self.path / CONFIG, f"run has no kind; known kinds: {', '.join(LOADERS)}")
            self._kind = kind
        return self._kind

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, kind={self._kind!r})"

    # -- writing
    def write_config(self, config: dict[str, Any]) -> Path:
        """config.json with kind, format_version and environment added (a given environment is kept)."""
        if self._kind is None:
            raise ValueError("RunDir needs a kind to write a new run")
        full = {"kind": self._kind, "format_version": FORMAT_VERSION, **config}
        full["kind"], full["format_version"] = self._kind, FORMAT_VERSION
        full.setdefault("environment", environment())
        return write_json(self.path / CONFIG, full)

    def write_weights(self, tensors: Any, name: str = "model.safetensors",
                      metadata: dict[str, str] | None = None) -> Path:
        """A state dict (or an nn.Module's) as safetensors, atomically; never pickle."""
        from safetensors.torch import save

        if hasattr(tensors, "state_dict"):
            tensors = tensors.state_dict()
        sd = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return _atomic_write(self.path / name, save(sd, metadata=metadata))

    def write_metrics(self, metrics: dict[str, Any], merge: bool = True) -> Path:
        """metrics.json; with merge, new values update the ones already there."""
        cur = self.metrics() if merge else {}
        cur.update(metrics)
        return write_json(self.path / METRICS, cur)

    def write_json(self, name: str, obj: Any) -> Path:
        """Any other JSON file of the run, atomically."""
        return write_json(self.path / name, obj)

    def write_table(self, name: str, df: Any) -> Path:
        """A pandas table as .csv or .parquet (by the name's suffix), atomically."""
        import io

        buf = io.BytesIO()
        if name.endswith(".parquet"):
            df.to_parquet(buf, index=False)
        elif name.endswith(".csv"):
            buf.write(df.to_csv(index=False).encode())
        else:
            raise ValueError(f"tables are .csv or .parquet, not {name!r}")
        return _atomic_write(self.path / name, buf.getvalue())

    def write_text(self, name: str, text: str) -> Path:
        """A text file of the run (logs, cards), atomically."""
        return _atomic_write(self.path / name, text.encode())

    def save_figure(self, fig: Any, name: str, dpi: int = 100) -> Path:
        """A matplotlib figure as PNG (atomic), then closed."""
        import io

        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        try:
            fig.savefig(buf, format="png", dpi=dpi)
        finally:
            plt.close(fig)
        return _atomic_write(self.path / name, buf.getvalue())

    def write_card(self) -> Path:
        """README.md model card from config.json + metrics.json."""
        from medfm.modelcard import write_card

        return write_card(self)

    # -- reading
    def config(self) -> dict[str, Any]:
        """config.json, with the kind normalised for runs written before format version 2."""
        p = self.path / CONFIG
        if not p.is_file():
            raise InputError(self.path, "not a run directory (no config.json)")
        conf = read_json(p)
        if not isinstance(conf, dict):
            raise InputError(p, "config.json is not a JSON object")
        kind = infer_kind(conf)
        if kind is not None:
            conf["kind"] = kind
        return conf

    def metrics(self) -> dict[str, Any]:
        """metrics.json ({} when the run has none yet)."""
        p = self.path / METRICS
        return read_json(p) if p.is_file() else {}


def open_run(path: str | Path) -> RunDir:
    """An existing run directory; InputError if path is not one."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise InputError(p, "run directory not found" if not p.exists() else "not a run directory (a file)")
    run = RunDir(p)
    run._kind = run.config().get("kind") or None  # raises if no readable config.json; kind read once
    return run


def _resolve(target: str) -> Any:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def load_run(path: str | Path) -> Any:
    """The object a run directory holds, by its kind: an Encoder, a ClipModel, a classifier, a segmenter..."""
    run = open_run(path)
    kind = run.kind
    if kind not in LOADERS:
        raise InputError(run.path / CONFIG, f"unknown run kind '{kind}'; known kinds: {', '.join(LOADERS)}")
    return _resolve(LOADERS[kind])(run.path)


def load_adapt_results(path: str | Path) -> Any:
    """An adaptation run (``medfm adapt``): its results table (one row per method, budget and seed)."""
    import pandas as pd

    p = Path(path) / "results.csv"
    if not p.is_file():
        raise InputError(path, "adapt run has no results.csv (did the run finish?)")
    return pd.read_csv(p)
