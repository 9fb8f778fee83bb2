"""``export_run``: a classifier, encoder or segmenter run -> a self-describing export folder (kind "export").

Folder: ``model.onnx`` (fp32), ``model.int8.onnx`` (dynamic int8), ``model.int8-static.onnx`` (static QDQ
int8, with a calibration store), ``config.json`` (source kind, preprocessing, classes, task, threshold,
input shape and layout, files, sizes, parity and test-split deltas) and a ``README.md`` card. The models
take float32 (B, C, H, W) or (B, C, D, H, W) already at the encoder's size (uint8 / 255, channels
replicated, resized: ``config["input"]``) and give classifier logits or encoder embeddings. Segmenters
are exported by :mod:`medfm.export.segment` (logits (B, K, *patch) at the run's window, test-split Dice).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medfm.errors import ConfigError, InputError, MedfmError
from medfm.export.to_onnx import export_onnx, max_abs_diff, torch_outputs
from medfm.rundir import RunDir, open_run

EXPORTABLE = ("classifier", "encoder", "segmenter")
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "int8_static": "model.int8-static.onnx"}
N_RANDOM = 8


class ExportError(MedfmError):
    """A model that did not export or does not match PyTorch after export."""


def _load_source(run: RunDir) -> tuple[nn.Module, Any]:
    """(module to export, encoder) of a classifier or encoder run."""
    if run.kind not in EXPORTABLE:
        raise InputError(run.path, f"cannot export a '{run.kind}' run yet; exportable kinds: "
                         f"{', '.join(EXPORTABLE)}")
    if run.kind == "classifier":
        from medfm.tasks.adapt.classifier import load_classifier

        clf = load_classifier(run.path)
        return clf, clf.encoder
    from medfm.models.io import load_encoder

    enc = load_encoder(run.path).eval()
    return enc, enc


def input_shape(encoder: Any) -> list[int]:
    """[C, *spatial] the encoder takes."""
    dims = int(getattr(encoder, "spatial_dims", 2))
    size = getattr(encoder, "img_size", None)
    if size is None:
        raise InputError(None, f"encoder '{encoder.config.get('name')}' records no input size")
    size = list(size) if isinstance(size, list | tuple) else [size] * dims
    return [int(getattr(encoder, "in_chans", 1)), *map(int, size)]


def store_inputs(store: str | Path, encoder: Any, split: str | None, n: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """(float32 model inputs, labels or None) of up to ``n`` cases (random subset) of a prepared store."""
    from medfm.data.store import PreparedDataset
    from medfm.tasks.adapt.features import to_model_input

    ds = PreparedDataset(store, split)
    idx = np.arange(len(ds))
    if n < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(idx, n, replace=False))
    if not len(idx):
        return np.zeros((0, *input_shape(encoder)), np.float32), None
    x = to_model_input(np.stack([ds.image_array(int(i)) for i in idx]), encoder).numpy()
    labels = ds.labels()
    return x.astype(np.float32), (None if labels is None else np.asarray(labels)[idx])


def auroc(task: str, y: np.ndarray | None, logits: np.ndarray) -> float | None:
    """Test-split AUROC of logits: binary, macro one-vs-rest (multi-class) or macro per label."""
    from scipy.special import expit, softmax
    from sklearn.metrics import roc_auc_score

    if y is None or not len(y):
        return None
    try:
        if task == "binary":
            keep = y >= 0
            return float(roc_auc_score(y[keep], softmax(logits[keep], axis=1)[:, 1]))
        if task == "multiclass":
            keep = y >= 0
            return float(roc_auc_score(y[keep], softmax(logits[keep], axis=1), multi_class="ovr"))
        scores = [roc_auc_score(y[y[:, j] >= 0, j], expit(logits[y[:, j] >= 0, j]))
                  for j in range(y.shape[1]) if len(set(y[y[:, j] >= 0, j])) == 2]
        return float(np.mean(scores)) if scores else None
    except ValueError:  # one class only in the test split
        return None


def _ort_outputs(path: Path, x: np.ndarray, threads: int = 0) -> np.ndarray:
    from medfm.export.session import ExportedModel

    try:
        m = ExportedModel(path, {}, path.name, threads)
    except Exception as e:  # onnxruntime rejects the graph: a one-line error, not its C++ trace
        raise ExportError(f"{path.name}: onnxruntime cannot load the exported graph "
                          f"({str(e).splitlines()[0][:200]})") from None
    return np.concatenate([m.run(x[i:i + 32]) for i in range(0, len(x), 32)])


def _out_folder(out_dir: str | Path, run: RunDir) -> RunDir:
    if Path(out_dir).expanduser().resolve() == run.path.resolve():
        raise InputError(Path(out_dir), "export folder must differ from the run directory")
    return RunDir(out_dir, "export")


def export_run(run_dir: str | Path, out_dir: str | Path, int8: bool = True, calib_store: str | None = None,
               n_calib: int = 256, atol: float = 1e-4, seed: int = 0, threads: int = 0) -> dict[str, Any]:
    """Export a classifier, encoder or segmenter run to ONNX in ``out_dir``; returns the written config.

    fp32 outputs are checked against PyTorch on random inputs (and on ``calib_store`` images) and must
    agree within ``atol`` (max abs), else :class:`ExportError`. With ``int8``: a dynamic int8 variant, and
    with ``calib_store`` (a prepared dataset) a static QDQ one calibrated on up to ``n_calib`` of its train
    images; each variant's file size and max diff vs fp32 are recorded, and for a classifier whose store
    has a labelled test split, the AUROC of PyTorch and of every variant on it (segmenters: the Dice per
    class, ``medfm.export.segment``). ``threads``: onnxruntime intra-op threads while measuring (0: default).
    """
    from medfm.export import card  # noqa: F401  (registers the "export" card section)

    if n_calib < 1:
        raise ConfigError(f"n_calib must be at least 1, got {n_calib}")

    run = open_run(run_dir)
    src_conf = run.config()
    if run.kind == "segmenter":
        from medfm.export.segment import export_segmenter

        out = _out_folder(out_dir, run)
        return export_segmenter(run, out, int8, calib_store, n_calib, atol, seed, threads)
    module, encoder = _load_source(run)
    shape = input_shape(encoder)
    out = _out_folder(out_dir, run)
    rng = np.random.default_rng(seed)
    inputs = {"random": rng.random((N_RANDOM, *shape), dtype=np.float32)}
    test_y = None
    if calib_store is not None:
        inputs["calib"], _ = store_inputs(calib_store, encoder, "train", n_calib, seed)
        if not len(inputs["calib"]):
            inputs["calib"], _ = store_inputs(calib_store, encoder, None, n_calib, seed)
        if run.kind == "classifier":
            try:
                inputs["test"], test_y = store_inputs(calib_store, encoder, "test", 10**9, seed)
            except InputError:
                pass  # a store without a test split: no accuracy delta
    ref = {k: torch_outputs(module, x) for k, x in inputs.items() if len(x)}

    fp32 = export_onnx(module, shape, out.path / FILES["fp32"],
                       "logits" if run.kind == "classifier" else "embedding")
    variants: dict[str, Any] = {}
    outs: dict[str, dict[str, np.ndarray]] = {}

    def measure(name: str, p: Path) -> None:
        outs[name] = {k: _ort_outputs(p, inputs[k], threads) for k in ref}
        base = ref if name == "fp32" else outs["fp32"]
        vs = "torch" if name == "fp32" else "fp32"
        variants[name] = {"file": p.name, "bytes": p.stat().st_size, "vs": vs,
                          "max_abs_diff": {k: max_abs_diff(outs[name][k], base[k]) for k in ref}}

    measure("fp32", fp32)  # before quantising: a graph that fails here is not worth quantising
    worst = max(variants["fp32"]["max_abs_diff"].values())
    if worst > atol:
        raise ExportError(f"{fp32}: ONNX fp32 outputs differ from PyTorch by {worst:.3g} (> {atol:g})")
    paths = {"fp32": fp32}
    if int8:
        from medfm.export.quantize import quantize_dynamic_int8, quantize_static_int8

        paths["int8"] = quantize_dynamic_int8(fp32, out.path / FILES["int8"])
        if calib_store is not None and len(inputs.get("calib", [])):
            paths["int8_static"] = quantize_static_int8(fp32, out.path / FILES["int8_static"],
                                                        inputs["calib"])
        for name in [n for n in paths if n != "fp32"]:
            measure(name, paths[name])
    task = src_conf.get("task") if run.kind == "classifier" else None
    if "test" in ref and test_y is not None:
        variants["torch"] = {"test_auroc": auroc(task, test_y, ref["test"])}
        for name in paths:
            variants[name]["test_auroc"] = auroc(task, test_y, outs[name]["test"])
    config = {
        "source_kind": run.kind, "source": run.path.name, "task": task,
        "classes": src_conf.get("classes") if run.kind == "classifier" else None,
        "threshold": src_conf.get("threshold") if run.kind == "classifier" else None,
        "threshold_rule": src_conf.get("threshold_rule"),
        "encoder": dict(getattr(encoder, "config", {}) or {}),
        "preprocessing": src_conf.get("preprocessing") or {},
        "data": src_conf.get("data") or [],
        "input_shape": shape,
        "input": {"name": "image", "dtype": "float32", "layout": "NCHW" if len(shape) == 3 else "NCDHW",
                  "scale": "uint8 / 255", "channels": "grey replicated to C", "resize": "to input_shape "
                  "(bilinear / trilinear)"},
        "output": "logits" if run.kind == "classifier" else "embedding",
        "files": {k: p.name for k, p in paths.items()},
        "variants": variants, "atol": atol,
        "calibration": ({"store": Path(str(calib_store)).name, "images": len(inputs.get("calib", []))}
                        if calib_store is not None else None),
    }
    out.write_config(config)
    out.write_metrics({"variants": variants}, merge=False)
    out.write_card()
    return out.config()
