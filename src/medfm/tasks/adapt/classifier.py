"""The adapted classifier: an encoder + head saved as a run directory of kind "classifier".

``medfm adapt --save-model`` (and :func:`medfm.tasks.adapt.single.fit_classifier`) write one;
``medfm.load_run`` gives back a :class:`Classifier`, and :func:`predict_store` runs it over a prepared
dataset.

Files: ``config.json`` (encoder config, head spec, task, classes, threshold and how it was chosen, the
training store's preprocessing, method, budget, seed), ``encoder.safetensors`` (the encoder alone, config in
its header: ``medfm.load_encoder`` reads it), ``head.safetensors``, ``metrics.json``, ``README.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from medfm.errors import ConfigError, InputError
from medfm.rundir import RunDir, open_run
from medfm.tasks.adapt.features import to_model_input

ENCODER_FILE, HEAD_FILE = "encoder.safetensors", "head.safetensors"
# manifest columns that are storage bookkeeping or free text, not case metadata
_NOT_METADATA = {"shard", "index", "has_mask", "report", "source", "orig_shape", "orig_spacing"}


class Classifier(nn.Module):
    """Encoder -> pooled embedding -> head.

    ``forward`` gives logits (B, K) with K = number of classes (binary: K = 2, logits (0, z) so that the
    softmax is the sigmoid the head was trained with) or of labels (multi-label). ``predict_proba`` is the
    softmax (binary, multi-class) or the per-label sigmoid (multi-label). Inputs may be uint8 or float,
    any channel count or size: they are converted to the encoder's input like the training images were.
    ``threshold``: the binary decision threshold (a list, one per label, for multi-label; None for
    multi-class, which uses the argmax).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, task: str, classes: list[str],
                 threshold: float | list[float] | None = None, preprocessing: dict[str, Any] | None = None,
                 method: str = "") -> None:
        super().__init__()
        if task not in ("binary", "multiclass", "multilabel"):
            raise ConfigError(f"classifier task must be binary, multiclass or multilabel, got {task!r}")
        self.encoder, self.head, self.task = encoder, head, task
        self.classes = [str(c) for c in classes]
        self.threshold = threshold
        self.preprocessing = dict(preprocessing or {})
        self.method = method

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled encoder features (B, D)."""
        return self.encoder(to_model_input(x, self.encoder).to(device_of(self)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.embed(x))
        return torch.cat([torch.zeros_like(z), z], dim=1) if self.task == "binary" else z

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, K): softmax over classes, or per-label sigmoid (multi-label)."""
        z = self.forward(x)
        return torch.sigmoid(z) if self.task == "multilabel" else torch.softmax(z, dim=1)


def device_of(m: nn.Module) -> torch.device:
    """The device of a module's parameters (CPU for one without any)."""
    return next(m.parameters(), torch.zeros(0)).device


# ---------------------------------------------------------------- heads: a spec in config.json rebuilds one


def head_spec(head: nn.Module) -> dict[str, Any]:
    """What rebuilds ``head`` (its weights come from head.safetensors)."""
    if isinstance(head, nn.Linear):
        return {"type": "linear", "in_features": head.in_features, "out_features": head.out_features}
    spec = getattr(head, "spec", None)
    if isinstance(spec, dict) and spec.get("type") in _HEADS:
        return dict(spec)
    raise ConfigError(f"cannot save a classifier head of type {type(head).__name__}")


def _prototype(**kw: Any) -> nn.Module:
    from medfm.tasks.adapt.prototype import PrototypeHead

    return PrototypeHead(**kw)


_HEADS = {"linear": lambda **kw: nn.Linear(**kw), "prototype": _prototype}


def build_head(spec: dict[str, Any], where: Path | str = "config.json") -> nn.Module:
    kind = spec.get("type")
    if kind not in _HEADS:
        raise InputError(where, f"unknown classifier head type {kind!r}; known: {', '.join(_HEADS)}")
    return _HEADS[kind](**{k: v for k, v in spec.items() if k != "type"})


# ---------------------------------------------------------------- save / load


def save_classifier(clf: Classifier, out_dir: str | Path, *, threshold_rule: str = "",
                    budget: dict[str, Any] | None = None, seed: int | None = None,
                    data: list[dict[str, Any]] | None = None, metrics: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> RunDir:
    """Write ``clf`` as a run directory of kind "classifier" (config, safetensors weights, metrics, card).

    ``threshold_rule`` says how the threshold was chosen (e.g. "youden on val"); ``data`` describes the
    training data as ``[{name, split, images, patients, sites}]`` (names only, never full paths).
    """
    from medfm.models.io import META_KEY

    enc_cfg = dict(getattr(clf.encoder, "config", {}) or {})
    if not enc_cfg.get("name"):
        raise ConfigError("the classifier's encoder has no config (build it with "
                          "medfm.models.create_encoder), so it could not be rebuilt")
    run = RunDir(out_dir, "classifier")
    run.write_weights(clf.encoder, ENCODER_FILE, metadata={META_KEY: json.dumps(enc_cfg), "format": "pt"})
    run.write_weights(clf.head, HEAD_FILE)
    run.write_config({
        "task": clf.task, "classes": clf.classes, "method": clf.method,
        "threshold": clf.threshold, "threshold_rule": threshold_rule or "given",
        "encoder": enc_cfg, "head": head_spec(clf.head), "preprocessing": clf.preprocessing,
        "budget": budget, "seed": seed, "data": data or [], **(extra or {})})
    run.write_metrics(metrics or {}, merge=False)
    run.write_card()
    return run


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """The :class:`Classifier` a "classifier" run directory holds (eval mode)."""
    from safetensors.torch import load_file

    from medfm.models.io import load_encoder

    run = open_run(path)
    conf = run.config()
    if run.kind != "classifier":
        raise InputError(run.path, f"run is a '{run.kind}' run, not a 'classifier' run")
    for name in (ENCODER_FILE, HEAD_FILE):
        if not (run.path / name).is_file():
            raise InputError(run.path / name, "classifier weights missing")
    if not isinstance(conf.get("head"), dict) or "task" not in conf:
        raise InputError(run.path / "config.json", "classifier config has no 'head' or 'task'")
    if isinstance(conf.get("pruned_shapes"), dict):  # `medfm prune`: layers narrower than the config says
        encoder = _load_pruned_encoder(run.path / ENCODER_FILE, conf["pruned_shapes"])
    else:
        encoder = load_encoder(run.path / ENCODER_FILE)
    head = build_head(conf["head"], run.path / "config.json")
    try:
        head.load_state_dict(load_file(str(run.path / HEAD_FILE)))
    except RuntimeError as e:
        raise InputError(run.path / HEAD_FILE,
                         f"head weights do not fit its config ({str(e)[:120]})") from None
    clf = Classifier(encoder, head, conf["task"], conf.get("classes") or [], conf.get("threshold"),
                     conf.get("preprocessing"), conf.get("method", ""))
    return clf.to(device).eval()


def resize_to_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> nn.Module:
    """Replace every Conv / Linear / BatchNorm / LayerNorm of ``model`` whose weight shape differs from
    ``sd``'s by one of the saved shape (a structurally pruned model), and resize loose parameters."""
    for name, m in list(model.named_modules()):
        w = sd.get(f"{name}.weight" if name else "weight")
        if w is None or not hasattr(m, "weight") or m.weight is None or w.shape == m.weight.shape:
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            dw = m.groups == m.in_channels == m.out_channels and m.groups > 1
            groups = w.shape[0] if dw else m.groups
            new: nn.Module = type(m)(w.shape[1] * groups, w.shape[0], m.kernel_size, m.stride, m.padding,
                                     m.dilation, groups, m.bias is not None, m.padding_mode)
        elif isinstance(m, nn.Linear):
            new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            new = type(m)(w.shape[0], m.eps, m.momentum, m.affine, m.track_running_stats)
        elif isinstance(m, nn.LayerNorm):
            new = nn.LayerNorm(tuple(w.shape), m.eps, m.elementwise_affine, bias=m.bias is not None)
        else:
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new)
    for name, p in list(model.named_parameters()):  # e.g. LayerScale gamma
        if name in sd and sd[name].shape != p.shape:
            mod = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(mod, name.rpartition(".")[2], nn.Parameter(torch.empty(sd[name].shape, dtype=p.dtype),
                                                               requires_grad=p.requires_grad))
    return model


def _load_pruned_encoder(path: Path, shapes: dict[str, Any]) -> nn.Module:
    """A pruned encoder: the base architecture from the header, its layers resized to the saved tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from medfm.models.io import META_KEY
    from medfm.models.registry import create_encoder

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        enc = create_encoder(**json.loads(meta[META_KEY]))
    except (KeyError, json.JSONDecodeError):
        raise InputError(path, f"no '{META_KEY}' config in the header") from None
    sd = load_file(str(path))
    resize_to_state_dict(enc, sd)
    try:
        enc.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise InputError(path, f"pruned weights do not fit the encoder ({str(e)[:120]})") from None
    if shapes.get("embed_dim"):
        enc.embed_dim = int(shapes["embed_dim"])
    if shapes.get("feature_dims"):
        enc.feature_dims = [int(d) for d in shapes["feature_dims"]]
    return enc


# ---------------------------------------------------------------- inference on a prepared store


@torch.no_grad()
def predict_arrays(clf: Classifier, images: np.ndarray,
                   batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, K) float64, features (n, D) float32) of an image array (n, C, ...)."""
    was = clf.training
    clf.eval()
    probs, feats = [], []
    for i in range(0, len(images), batch_size):
        f = clf.embed(torch.as_tensor(np.asarray(images[i:i + batch_size])))
        z = clf.head(f)
        z = torch.cat([torch.zeros_like(z), z], dim=1) if clf.task == "binary" else z
        p = torch.sigmoid(z) if clf.task == "multilabel" else torch.softmax(z.double(), dim=1)
        probs.append(p.double().cpu().numpy())
        feats.append(f.float().cpu().numpy())
    clf.train(was)
    k = len(clf.classes) or 1
    dim = int(getattr(clf.encoder, "embed_dim", 0))
    return (np.concatenate(probs) if probs else np.zeros((0, k)),
            np.concatenate(feats) if feats else np.zeros((0, dim), np.float32))


def predict_store(clf: Classifier, store_dir: str | Path, split: str | list[str] | None = None,
                  batch_size: int = 32, return_features: bool = False
                  ) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray]:
    """Predictions for every case of a prepared store (or its ``split``).

    Columns: ``case_id``; the store's case metadata (``patient_id``, ``site``, ``sex``, ``age``,
    ``split``...); ``label`` (NaN where the store has none; ``label_<name>`` per label for multi-label);
    ``prob`` (binary: positive-class probability) or ``prob_<class>`` per class / label; ``pred`` (binary:
    prob >= threshold, 0.5 without one; multi-class: argmax). With ``return_features`` also the (n, D)
    embeddings.
    """
    from medfm.data.store import PreparedDataset

    ds = PreparedDataset(store_dir, split)
    images = np.stack([ds.image_array(i) for i in range(len(ds))]) if len(ds) else np.zeros((0, 1, 1, 1))
    probs, feats = predict_arrays(clf, images, batch_size)
    m = ds.manifest
    lab_cols = list(ds.label_columns)
    df = pd.DataFrame({"case_id": m["case_id"].astype(str).to_numpy()})
    for c in m.columns:
        if c not in _NOT_METADATA and c not in lab_cols and c != "case_id":
            df[c] = m[c].to_numpy()
    labels = ds.labels()
    if labels is not None:  # prepare writes -1 for a missing label: unknown, not a class
        labels = np.where(labels < 0, np.nan, labels.astype(np.float64))
    names = clf.classes if len(clf.classes) == probs.shape[1] else [str(j) for j in range(probs.shape[1])]
    if clf.task == "multilabel":
        fits = labels is not None and labels.ndim == 2 and labels.shape[1] == len(names)
        for j, n in enumerate(names):
            df[f"label_{n}"] = labels[:, j] if fits else np.nan
        for j, n in enumerate(names):
            df[f"prob_{n}"] = probs[:, j]
    else:
        df["label"] = labels if labels is not None and labels.ndim == 1 else np.nan
        if clf.task == "binary":
            df["prob"] = probs[:, 1]
            thr = clf.threshold if isinstance(clf.threshold, int | float) else 0.5
            df["pred"] = (probs[:, 1] >= thr).astype(int)
        else:
            for j, n in enumerate(names):
                df[f"prob_{n}"] = probs[:, j]
            df["pred"] = probs.argmax(1)
    return (df, feats) if return_features else df
