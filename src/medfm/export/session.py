"""Run an exported folder (``medfm export``) with onnxruntime on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medfm.errors import InputError
from medfm.export.to_onnx import INPUT
from medfm.rundir import open_run


class ExportedModel:
    """One ONNX variant of an exported folder: ``run(x)`` maps float32 (B, *input_shape) to the outputs
    (classifier logits (B, K) or encoder embeddings (B, D)); ``config`` is the folder's config.json."""

    def __init__(self, path: Path, config: dict[str, Any], variant: str, threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.path, self.config, self.variant = path, config, variant
        self.input_shape = [int(s) for s in config.get("input_shape") or []]
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray) -> np.ndarray:
        """Outputs for a float32 batch already at the model's input shape (see config["input"])."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.input_shape and list(x.shape[1:]) != self.input_shape:
            want = ", ".join(map(str, self.input_shape))
            raise InputError(None, f"exported model expects input (B, {want}), got {tuple(x.shape)}")
        return self.session.run(None, {INPUT: x})[0]

    def __repr__(self) -> str:
        return f"ExportedModel({self.path.parent.name!r}, variant={self.variant!r})"


def load_exported(path: str | Path, variant: str = "fp32", threads: int = 0) -> ExportedModel:
    """The ``variant`` ("fp32", "int8", "int8_static") of an exported folder; ``threads``: onnxruntime
    intra-op threads (0: its default)."""
    run = open_run(path)
    conf = run.config()
    if run.kind != "export":
        raise InputError(run.path, f"a '{run.kind}' run, not an exported model (make one with medfm export)")
    files = conf.get("files") or {}
    if variant not in files:
        raise InputError(run.path, f"no '{variant}' variant; this export has: {', '.join(files) or 'none'}")
    p = run.path / files[variant]
    if not p.is_file():
        raise InputError(p, "exported model file missing")
    return ExportedModel(p, conf, variant, threads)
