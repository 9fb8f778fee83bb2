"""A served model: one run directory (or export) loaded once, its capabilities and its content hash."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfm.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".onnx")


def model_hash(path: str | Path) -> str:
    """sha256 (first 16 hex) over the run's config and weight files: what a result was produced by."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(p if p.is_dir() else p.parent).as_posix().encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass
class Served:
    """``predictor`` (classifier / segmenter / encoder / export) or ``clip`` (image-report model), or a
    promptable segmenter in ``promptable``."""

    name: str
    kind: str
    hash: str
    predictor: Any = None
    clip: Any = None
    promptable: Any = None
    spec: dict[str, Any] = field(default_factory=dict)
    label_columns: list[str] = field(default_factory=list)

    @property
    def source_kind(self) -> str:
        return self.predictor.source_kind if self.predictor is not None else self.kind

    @property
    def capabilities(self) -> list[str]:
        """The endpoints / tools this model answers."""
        sk = self.source_kind
        if sk == "classifier":
            caps = ["classify"]
            if self.predictor.kind == "classifier":  # saliency needs gradients: the PyTorch model
                caps.append("explain")
            return caps
        if sk == "segmenter":
            return ["segment"]
        if self.kind == "promptable":
            return ["segment_box"]
        if self.kind == "clip":
            return ["zero_shot", "similar", "report"]
        return ["embed"]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "hash": self.hash,
                               "capabilities": self.capabilities}
        if self.predictor is not None:
            out |= {"task": self.predictor.task, "classes": self.predictor.classes}
        return out

    def stamp(self) -> dict[str, str]:
        """What every result records about the model that produced it."""
        return {"name": self.name, "kind": self.kind, "hash": self.hash}


def load_served(path: str | Path, name: str | None = None) -> Served:
    """Load one run (classifier, encoder, segmenter, promptable, CLIP) or export folder, once."""
    from medfm.rundir import open_run

    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(p, "model not found (a run directory or an exported folder)")
    label = name or p.name
    kind = open_run(p).kind if p.is_dir() else "encoder"
    if kind == "clip":
        from medfm.data.pairs import input_spec
        from medfm.models.clip import load_clip

        model = load_clip(p).eval()
        spec = input_spec(getattr(model, "preprocessing", None), model.cfg.img_size, model.cfg.in_chans)
        return Served(label, kind, model_hash(p), clip=model, spec=spec)
    if kind == "promptable":
        from medfm.tasks.segment.runs import load_promptable, preprocessing, run_config

        return Served(label, kind, model_hash(p), promptable=load_promptable(p).eval(),
                      spec=preprocessing(run_config(p, "promptable")))
    from medfm.predict.model import load_predictor

    pred = load_predictor(p)
    conf = open_run(p).config() if p.is_dir() else {}
    cols = [str(c) for c in conf.get("label_columns") or []]
    return Served(label, kind, model_hash(p), predictor=pred, spec=pred.spec, label_columns=cols)
