"""PyTorch module -> ONNX file with a dynamic batch axis, and the parity check against PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT, OPSET = "image", 17


def export_onnx(module: nn.Module, input_shape: list[int], path: str | Path, output_name: str) -> Path:
    """Trace ``module`` (eval mode, CPU, float32) on a (2, *input_shape) example and write it to ``path``.

    The TorchScript exporter (``dynamo=False``) is used: it needs no extra package and handles every medfm
    encoder; the batch axis is dynamic, every other axis fixed at ``input_shape``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.float().cpu().eval()
    example = torch.rand(2, *input_shape)
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings about Python branches on shapes: the spatial shape is fixed by design.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(tmp), dynamo=False, input_names=[INPUT],
                          output_names=[output_name], opset_version=OPSET,
                          dynamic_axes={INPUT: {0: "batch"}, output_name: {0: "batch"}})
    _fix_negative_perms(tmp)
    tmp.replace(path)  # atomic: a reader never sees half a model
    return path


def _fix_negative_perms(path: Path) -> None:
    """Make Transpose permutations non-negative in place.

    The TorchScript exporter copies ``movedim(1, -1)``'s negative axes into Transpose's ``perm``, which
    ONNX forbids and onnxruntime rejects (ConvNeXt / hybrid channels-last LayerNorms).
    """
    import onnx

    model = onnx.load(str(path))
    changed = False
    for node in model.graph.node:
        if node.op_type != "Transpose":
            continue
        for attr in node.attribute:
            if attr.name == "perm" and any(p < 0 for p in attr.ints):
                fixed = [p % len(attr.ints) for p in attr.ints]
                del attr.ints[:]
                attr.ints.extend(fixed)
                changed = True
    if changed:
        onnx.save(model, str(path))


@torch.no_grad()
def torch_outputs(module: nn.Module, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """``module``'s float32 outputs for a float32 array, in batches."""
    module = module.float().cpu().eval()
    out = [module(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute element difference of two same-shape arrays."""
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
