"""The model side of `medfm predict`: a classifier, encoder or segmenter run, or an exported (ONNX) folder,
behind one interface that maps a batch of prepared images to output columns (and embeddings); segmenters
carry a module that maps one image to logits (``medfm.predict.masks`` turns them into masks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from medfm.errors import InputError


@dataclass
class Predictor:
    """``infer(x)`` maps a float32 batch (B, C, ...) in [0, 1], as prepare stores it, to (probabilities (B, K)
    or None, embeddings (B, D) or None). ``spec``: the preprocessing raw inputs replay (the run's own)."""

    kind: str  # "classifier" | "encoder" | "export"
    source_kind: str  # what produces the outputs: "classifier" | "encoder"
    spec: dict[str, Any]
    infer: Callable[[torch.Tensor], tuple[np.ndarray | None, np.ndarray | None]]
    task: str | None = None
    classes: list[str] = field(default_factory=list)
    threshold: float | list[float] | None = None
    segmenter: torch.nn.Module | None = None
    seg: dict[str, Any] | None = None
    module: torch.nn.Module | None = None  # the PyTorch classifier (saliency, features), when there is one

    def columns(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        """Output columns of a batch: binary ``prob``/``pred`` (the run's threshold, 0.5 without one);
        multi-class ``prob_<class>`` + ``pred`` (argmax index); multi-label ``prob_<l>``/``pred_<l>``."""
        k = probs.shape[1]
        names = self.classes if len(self.classes) == k else [str(j) for j in range(k)]
        if self.task == "binary":
            thr = self.threshold if isinstance(self.threshold, int | float) else 0.5
            return {"prob": probs[:, 1], "pred": (probs[:, 1] >= thr).astype(int)}
        if self.task == "multilabel":
            thr = self.threshold
            thrs = list(thr) if isinstance(thr, list | tuple) and len(thr) == len(names) else (
                [thr] * len(names) if isinstance(thr, int | float) else [0.5] * len(names))
            cols: dict[str, np.ndarray] = {f"prob_{n}": probs[:, j] for j, n in enumerate(names)}
            cols.update({f"pred_{n}": (probs[:, j] >= float(thrs[j])).astype(int)
                         for j, n in enumerate(names)})
            return cols
        cols = {f"prob_{n}": probs[:, j] for j, n in enumerate(names)}
        cols["pred"] = probs.argmax(1)
        return cols


def _from_logits(z: np.ndarray, task: str | None) -> np.ndarray:
    z = np.asarray(z, np.float64)
    if task == "multilabel":
        return 1.0 / (1.0 + np.exp(-z))
    if task == "binary" and z.shape[1] == 1:  # a single logit: the positive class
        p = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return np.stack([1 - p, p], 1)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _classifier(path: Path) -> Predictor:
    from medfm.data.pairs import input_spec
    from medfm.tasks.adapt.classifier import load_classifier, predict_arrays

    clf = load_classifier(path)
    enc = clf.encoder
    spec = input_spec(clf.preprocessing, getattr(enc, "img_size", 224), int(getattr(enc, "in_chans", 1)))

    def infer(x: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray | None]:
        probs, _ = predict_arrays(clf, x.numpy(), batch_size=max(1, len(x)))
        return probs, None

    return Predictor("classifier", "classifier", spec, infer, clf.task, list(clf.classes), clf.threshold,
                     module=clf)


def _encoder(path: Path, conf: dict[str, Any]) -> Predictor:
    from medfm.data.pairs import input_spec
    from medfm.models.io import load_encoder
    from medfm.tasks.adapt.features import to_model_input

    enc = load_encoder(path).eval()
    spec = input_spec(conf.get("preprocessing"), getattr(enc, "img_size", 224),
                      int(getattr(enc, "in_chans", 1)))

    @torch.no_grad()
    def infer(x: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray | None]:
        return None, enc(to_model_input(x, enc)).float().cpu().numpy()

    return Predictor("encoder", "encoder", spec, infer)


def _no_infer(x: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray | None]:
    raise InputError(None, "a segmenter predicts masks (medfm.predict.masks), not class probabilities")


def _segmenter(path: Path) -> Predictor:
    from medfm.tasks.segment.runs import load_segmentation_run, preprocessing

    model, conf = load_segmentation_run(path)
    seg = {k: conf.get(k) for k in ("spatial_dims", "in_chans", "patch", "img_size", "num_classes")}
    return Predictor("segmenter", "segmenter", preprocessing(conf), _no_infer, "segmentation",
                     [str(c) for c in conf.get("class_names") or []], None, model.eval(), seg)


def _export_segmenter(path: Path, conf: dict[str, Any], variant: str, threads: int) -> Predictor:
    from medfm.export.segment import OnnxSegmenter
    from medfm.tasks.segment.runs import preprocessing

    files = conf.get("files") or {}
    if variant not in files:
        raise InputError(path, f"no '{variant}' variant; this export has: {', '.join(files) or 'none'}")
    shape = [int(s) for s in conf["input_shape"]]
    seg = {"spatial_dims": int(conf["spatial_dims"]), "in_chans": shape[0], "patch": shape[1:],
           "img_size": conf.get("img_size"), "num_classes": int(conf["num_classes"])}
    try:
        model = OnnxSegmenter(path / files[variant], threads)
    except ImportError as e:
        raise InputError(path, f"exported models need onnxruntime ({e})") from None
    return Predictor("export", "segmenter", preprocessing(conf), _no_infer, "segmentation",
                     [str(c) for c in conf.get("classes") or []], None, model, seg)


def _export(path: Path, variant: str, threads: int) -> Predictor:
    import importlib

    from medfm.data.preprocess import make_spec
    from medfm.tasks.adapt.features import to_model_input

    try:
        session = importlib.import_module("medfm.export.session")
    except ImportError as e:
        raise InputError(path, f"exported models need onnxruntime ({e})") from None
    model = session.load_exported(path, variant=variant, threads=threads)
    conf = model.config
    shape = [int(s) for s in conf.get("input_shape") or []]
    if len(shape) < 3:
        raise InputError(path / "config.json", "exported model config has no input_shape [C, H, W]")
    # to_model_input fits channels and size to anything with in_chans / img_size
    target = SimpleNamespace(in_chans=shape[0], img_size=tuple(shape[1:]))
    spec = conf.get("preprocessing") or make_spec(size=int(shape[-1]), channels=shape[0])
    kind = conf.get("source_kind") or "classifier"
    task = conf.get("task")

    def infer(x: torch.Tensor) -> tuple[np.ndarray | None, np.ndarray | None]:
        out = model.run(to_model_input(x, target).numpy())
        if kind == "classifier":
            return _from_logits(out, task), None
        return None, np.asarray(out, np.float32)

    return Predictor("export", kind, spec, infer, task, [str(c) for c in conf.get("classes") or []],
                     conf.get("threshold"))


def load_predictor(path: str | Path, variant: str = "fp32", threads: int = 0) -> Predictor:
    """The predictor a classifier, encoder or segmenter run (or medfm encoder weights) or an export folder
    holds."""
    from medfm.rundir import open_run

    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(p, "model not found (a classifier, encoder or segmenter run, or an exported folder)")
    if p.is_file() or (not (p / "config.json").is_file() and (p / "model.safetensors").is_file()):
        return _encoder(p, {})  # medfm encoder weights (`save_encoder`), no run config
    run = open_run(p)
    conf = run.config()
    if run.kind == "classifier":
        return _classifier(p)
    if run.kind == "encoder":
        return _encoder(p, conf)
    if run.kind == "export":
        if conf.get("source_kind") == "segmenter":
            return _export_segmenter(p, conf, variant, threads)
        return _export(p, variant, threads)
    if run.kind == "segmenter":
        return _segmenter(p)
    raise InputError(p, f"a '{run.kind}' run; predict runs classifier, encoder and segmenter runs and "
                     "exported models")
