"""Shared pieces of pruning and distillation: store splits, MACs / params, AUROC, a head-convention model."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfm.errors import InputError
from medfm.tasks.adapt.classifier import Classifier, load_classifier, predict_arrays
from medfm.tasks.adapt.features import to_model_input


class HeadModel(nn.Module):
    """encoder -> head in the head convention (binary: one logit), what adapt's training loop expects."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def load_teacher(run_dir: str | Path) -> Classifier:
    """A classifier run (InputError naming the run when it is another kind or broken)."""
    return load_classifier(run_dir)


def split_arrays(store: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images, labels)} of a labelled prepared store (train and test required; val when present);
    cases with a missing label (-1) are dropped."""
    from medfm.tasks.adapt.runner import load_splits

    if not Path(store).is_dir():
        raise InputError(store, "prepared dataset not found")
    out = {}
    for name, ds in load_splits(store, ("train", "val", "test")).items():
        y = ds.labels()
        if y is None:
            raise InputError(store, f"split '{name}' has no labels")
        keep = (y >= 0).all(axis=1) if y.ndim == 2 else y >= 0
        idx = np.flatnonzero(keep)
        imgs = (np.stack([ds.image_array(int(i)) for i in idx]) if len(idx) else np.zeros((0, 1, 1, 1)))
        out[name] = (imgs, y[idx])
    return out


def example_input(encoder: nn.Module) -> torch.Tensor:
    """One zero image at the encoder's input shape (1, C, *size)."""
    dims = int(getattr(encoder, "spatial_dims", 2))
    size = encoder.img_size if isinstance(encoder.img_size, list | tuple) else [encoder.img_size] * dims
    return torch.zeros(1, int(encoder.in_chans), *map(int, size))


@torch.no_grad()
def macs_params(model: nn.Module, encoder: nn.Module) -> tuple[int, int]:
    """(multiply-accumulates of one image, parameters) of ``model``, counted by torch.utils.flop_counter
    (every matmul/conv/attention: FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = example_input(encoder).to(next(model.parameters()).device)
    was = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return int(fc.get_total_flops() // 2), int(sum(p.numel() for p in model.parameters()))


def positive(p: np.ndarray, task: str) -> np.ndarray:
    return p[:, 1] if task == "binary" else p


def test_auroc(clf: Classifier, images: np.ndarray, labels: np.ndarray) -> float | None:
    """AUROC (binary; macro one-vs-rest / per label) with adapt's metric helper; None if undefined."""
    from medfm.eval.metrics import classification_metrics

    if not len(images):
        return None
    p, _ = predict_arrays(clf, images)
    try:
        auc = float(classification_metrics(labels, positive(p, clf.task), clf.task)["auroc"])
    except Exception:  # one class only in the test split
        return None
    return auc if math.isfinite(auc) else None


def val_threshold(clf: Classifier, val: tuple[np.ndarray, np.ndarray] | None) -> tuple[Any, str]:
    """(threshold, rule): Youden's J on val for binary / multi-label, argmax for multi-class."""
    from medfm.eval.metrics import youden_threshold

    if clf.task == "multiclass":
        return None, "argmax"
    if val is None or not len(val[0]):
        return clf.threshold, "kept from the source run"
    p = positive(predict_arrays(clf, val[0])[0], clf.task)
    y = val[1]
    if clf.task == "binary":
        return float(youden_threshold(y, p)), "Youden's J on the validation split"
    return [float(youden_threshold(y[:, j], p[:, j])) for j in range(y.shape[1])], \
        "Youden's J on the validation split"


def progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=os.environ.get("MEDFM_PROGRESS", "1") == "0")


def model_inputs(images: np.ndarray, encoder: nn.Module) -> torch.Tensor:
    return to_model_input(images, encoder)


def data_entry(store: str | Path, train: tuple[np.ndarray, np.ndarray]) -> list[dict[str, Any]]:
    return [{"name": Path(store).name, "split": "train", "images": int(len(train[0])), "patients": None,
             "sites": None}]
