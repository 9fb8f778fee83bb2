"""int8 variants of an fp32 ONNX model with onnxruntime: dynamic (weights int8, activations quantised on
the fly; suits transformers' MatMul/Gemm) and static QDQ calibrated on prepared images."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from medfm.export.to_onnx import INPUT

# Conv is included so CNNs shrink too (ConvInteger runs on the CPU provider). Static QDQ quantises the same
# weight-carrying ops only: int8 activations around LayerNorm / Softmax / residual adds cost ViTs accuracy.
QUANT_OPS = ["MatMul", "Gemm", "Conv"]


def _preprocessed(src: Path, tmp: Path) -> Path:
    """Shape inference + graph folding onnxruntime recommends before quantisation (src when it fails)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "pre.onnx"
    try:
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    except Exception:  # an unusual graph: quantise the model as exported
        return src
    return out


def quantize_dynamic_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation of MatMul/Gemm/Conv weights (per channel) into ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="medfm-q-") as tmp:
        quantize_dynamic(str(_preprocessed(Path(src), Path(tmp))), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=QUANT_OPS, per_channel=True)
    return Path(dst)


class _Reader:
    """onnxruntime CalibrationDataReader over a float32 array, in batches."""

    def __init__(self, images: np.ndarray, batch_size: int = 16) -> None:
        self.batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {INPUT: np.ascontiguousarray(self.batches[self.i - 1], dtype=np.float32)}

    def rewind(self) -> None:
        self.i = 0


def last_conv(path: str | Path) -> list[str]:
    """Name of the graph's last Conv / ConvTranspose node (a segmenter's output layer), as a list."""
    import onnx

    convs = [n.name for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "ConvTranspose")]
    return convs[-1:]


def quantize_static_int8(src: str | Path, dst: str | Path, calib: np.ndarray, per_channel: bool = True,
                         exclude_last: bool = False) -> Path:
    """Static QDQ int8 (activations uint8 with ranges from ``calib``, weights int8 per channel or per
    tensor); ``exclude_last`` keeps the last convolution (a segmenter's logits layer) in fp32."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib)
    with tempfile.TemporaryDirectory(prefix="medfm-q-") as tmp:
        pre = _preprocessed(Path(src), Path(tmp))
        quantize_static(str(pre), str(dst), reader,
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=per_channel, op_types_to_quantize=QUANT_OPS,
                        nodes_to_exclude=last_conv(pre) if exclude_last else None)
    return Path(dst)
