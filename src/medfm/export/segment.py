"""Export of "segmenter" runs (`medfm segment train`, 2D and 3D): ONNX logits at the run's input window,
int8 variants, and the test-split Dice of PyTorch and of every ONNX variant.

The exported model maps float32 (B, C, *patch) to logits (B, K, *patch); masks are the argmax over the K
classes (background 0), as ``medfm.tasks.segment.infer`` takes them. Larger inputs (volumes, or 2D runs
trained on crops) are covered by a Gaussian-blended sliding window of that size (``config["inference"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medfm.errors import InputError
from medfm.rundir import RunDir

OVERLAP = 0.25


def input_shape(conf: dict[str, Any]) -> list[int]:
    """[C, *patch] of a segmenter run: the window it was trained on (default: the whole resized 2D image)."""
    return [int(conf["in_chans"]), *map(int, conf["patch"])]


def roi_size(conf: dict[str, Any]) -> list[int] | None:
    """Sliding-window size of a segmenter run, None when it sees the whole (resized) 2D image at once."""
    patch, size = conf.get("patch"), conf.get("img_size")
    if conf.get("spatial_dims") == 2 and size and patch and list(patch) == [size, size]:
        return None
    return [int(p) for p in patch]


def inference(conf: dict[str, Any]) -> dict[str, Any]:
    """How an export's logits become masks (recorded in its config.json)."""
    roi = roi_size(conf)
    return {
        "mode": "whole_image" if roi is None else "sliding_window",
        "roi_size": [int(p) for p in conf["patch"]], "overlap": OVERLAP, "blend": "gaussian",
        "mask": "argmax over the num_classes logits (0 = background); logits resized (bilinear / trilinear) "
                "to the input's grid before the argmax",
        "img_size": conf.get("img_size") if int(conf["spatial_dims"]) == 2 else None,
    }


class OnnxSegmenter(nn.Module):
    """An ONNX segmenter behind the PyTorch call ``medfm.tasks.segment.infer`` makes: (B, C, *patch) tensor
    -> logits tensor, so whole-image and sliding-window inference run unchanged on onnxruntime."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__()
        from medfm.export.session import ExportedModel

        self.model = ExportedModel(Path(path), {}, Path(path).name, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.model.run(x.detach().cpu().float().numpy()))


def pairs(conf: dict[str, Any], data: str | Path, split: str | None) -> Any:
    """A dataset's image/mask pairs as the run's training saw them (raw manifest files through its spec)."""
    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.runs import preprocessing

    return load_pairs(data, split, None, conf.get("img_size"), spec=preprocessing(conf))


def seg_calibration(conf: dict[str, Any], data: str | Path, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` training windows (float32 (n, C, *patch)) of ``data``: random cases, one crop each (half of
    them centred on foreground, as training crops are), no augmentation. All splits when there is no train."""
    from medfm.tasks.segment.data import CropDataset

    try:
        p = pairs(conf, data, "train")
    except InputError:
        p = pairs(conf, data, None)
    idx = np.arange(len(p))
    if n < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))
    sub = p.subset(idx.tolist())
    crops = CropDataset(sub, tuple(int(s) for s in conf["patch"]), augment=False, length=len(sub), seed=seed)
    return np.stack([crops[i]["image"].numpy() for i in range(len(sub))]).astype(np.float32)


def dice_per_class(preds: list[torch.Tensor], refs: list[torch.Tensor], num_classes: int,
                   names: list[str]) -> dict[str, float]:
    """Dice per foreground class (mean over the cases whose reference has the class) and their "mean"."""
    out: dict[str, float] = {}
    for k in range(1, num_classes):
        vals = []
        for p, t in zip(preds, refs):
            tk = t == k
            if not bool(tk.any()):
                continue
            pk = p == k
            vals.append(2.0 * float((pk & tk).sum()) / float(pk.sum() + tk.sum()))
        out[names[k - 1] if k - 1 < len(names) else f"class_{k}"] = (
            round(float(np.mean(vals)), 5) if vals else float("nan"))
    fg = [v for v in out.values() if not np.isnan(v)]
    out["mean"] = round(float(np.mean(fg)), 5) if fg else float("nan")
    return out


def segmenter_dice(model: nn.Module | str | Path, conf: dict[str, Any], data: str | Path | None = None,
                   test: Any = None, threads: int = 0) -> dict[str, float]:
    """Test-split Dice per class of a PyTorch segmenter or an ONNX file, on each case's own (native) grid."""
    from medfm.tasks.segment.infer import predict_pairs

    if not isinstance(model, nn.Module):
        model = OnnxSegmenter(model, threads)
    test = test if test is not None else pairs(conf, data, "test")
    preds = predict_pairs(model, test, roi_size(conf))
    names = list(conf.get("class_names") or [])
    return dice_per_class(preds, test.native_masks, int(conf["num_classes"]), names)


def export_segmenter(run: RunDir, out: RunDir, int8: bool, calib_store: str | None, n_calib: int,
                     atol: float, seed: int, threads: int) -> dict[str, Any]:
    """``export_run`` for a "segmenter" run (see there): parity on random and calibration windows at the
    run's input shape; per variant, its size, max logit diff and test-split Dice (delta vs PyTorch)."""
    from medfm.export.run import FILES, N_RANDOM, ExportError, _ort_outputs
    from medfm.export.to_onnx import export_onnx, max_abs_diff, torch_outputs
    from medfm.tasks.segment.runs import load_segmentation_run

    model, conf = load_segmentation_run(run.path)
    shape = input_shape(conf)
    rng = np.random.default_rng(seed)
    inputs = {"random": rng.random((N_RANDOM, *shape), dtype=np.float32)}
    test = None
    if calib_store is not None:
        inputs["calib"] = seg_calibration(conf, calib_store, n_calib, seed)
        try:
            test = pairs(conf, calib_store, "test")
        except InputError:
            test = None  # no labelled test split: no Dice
    ref = {k: torch_outputs(model, x, batch_size=8) for k, x in inputs.items() if len(x)}
    fp32 = export_onnx(model, shape, out.path / FILES["fp32"], "logits")
    variants: dict[str, Any] = {}
    outs: dict[str, dict[str, np.ndarray]] = {}
    paths = {"fp32": fp32}

    def measure(name: str, p: Path) -> None:
        outs[name] = {k: _ort_outputs(p, inputs[k], threads) for k in ref}
        base = ref if name == "fp32" else outs["fp32"]
        variants[name] = {"file": p.name, "bytes": p.stat().st_size,
                          "vs": "torch" if name == "fp32" else "fp32",
                          "max_abs_diff": {k: max_abs_diff(outs[name][k], base[k]) for k in ref}}

    measure("fp32", fp32)
    worst = max(variants["fp32"]["max_abs_diff"].values())
    if worst > atol:
        raise ExportError(f"{fp32}: ONNX fp32 logits differ from PyTorch by {worst:.3g} (> {atol:g})")
    if int8:
        from medfm.export.quantize import quantize_dynamic_int8, quantize_static_int8

        paths["int8"] = quantize_dynamic_int8(fp32, out.path / FILES["int8"])
        if "calib" in ref:
            dst = out.path / FILES["int8_static"]
            paths["int8_static"] = quantize_static_int8(fp32, dst, inputs["calib"])
        for name in [n for n in paths if n != "fp32"]:
            measure(name, paths[name])
    if test is not None:
        variants["torch"] = {"test_dice": segmenter_dice(model, conf, test=test)}
        for name, p in paths.items():
            d = segmenter_dice(p, conf, test=test, threads=threads)
            variants[name]["test_dice"] = d
            variants[name]["test_dice_delta"] = {k: round(v - variants["torch"]["test_dice"][k], 5)
                                                 for k, v in d.items()}
    dims = int(conf["spatial_dims"])
    config = {
        "source_kind": "segmenter", "source": run.path.name, "task": "segmentation",
        "classes": list(conf.get("class_names") or []), "num_classes": int(conf["num_classes"]),
        "threshold": None, "spatial_dims": dims, "decoder": conf.get("decoder"),
        "encoder": dict(conf.get("encoder") or {}),
        "preprocessing": conf.get("preprocessing") or {},
        "data": conf.get("data") or {},
        "input_shape": shape, "img_size": conf.get("img_size"),
        "input": {"name": "image", "dtype": "float32", "layout": "NCHW" if dims == 2 else "NCDHW",
                  "scale": "[0, 1] as prepare stores it (uint8 / 255 for 2D)", "channels": f"{shape[0]}",
                  "resize": "2D: the run's preprocessing, then to img_size (bilinear); 3D: own grid, "
                            "sliding window"},
        "output": "logits", "output_shape": ["B", int(conf["num_classes"]), *shape[1:]],
        "inference": inference(conf),
        "files": {k: p.name for k, p in paths.items()},
        "variants": variants, "atol": atol,
        "calibration": ({"store": Path(str(calib_store)).name, "images": len(inputs.get("calib", []))}
                        if calib_store is not None else None),
        "test": {"split": "test", "images": len(test)} if test is not None else None,
    }
    out.write_config(config)
    out.write_metrics({"variants": variants}, merge=False)
    out.write_card()
    return out.config()
