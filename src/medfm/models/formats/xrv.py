"""torchxrayvision (xrv) chest X-ray classifiers -> a medfm classifier run (multi-label pathology heads).

Two xrv networks load, from a plain state dict (.pt/.pth via the weights-only unpickler, or .safetensors):

- ``xrv.models.DenseNet`` (``densenet121-res224-*``): keys ``features.*``, ``classifier.*`` and, when saved
  from a model built with ``weights=``, the ``op_threshs`` buffer. The encoder is medfm's ``densenet121``
  (torchvision's DenseNet with xrv's 1-channel stem; the same key names).
- ``xrv.models.ResNet`` (``resnet50-res512-all``): a torchvision ResNet-50 with a 1-channel stem, either the
  release file itself (torchvision keys, ``fc`` with 18 outputs) or ``model.state_dict()`` of the xrv module
  (``model.*`` + ``op_threshs``). The encoder is ``tv_resnet50`` (torchvision's layout; medfm's own
  ``resnet50`` names its layers differently and pads a [0, 1] input, which is not exact here).

xrv's DenseNet release files are pickled whole modules: they are refused (loading them runs code), with
the one-line recipe that re-saves them as a state dict in torchxrayvision.

Input: xrv wants one channel in [-1024, 1024] (``xrv.utils.normalize`` of a [0, 255] image); the encoder's
config holds that scaling (mean 0.5, std 1/2048 on medfm's [0, 1] image), so
``medfm_logits(x) == xrv_logits(2048 x - 1024)``. xrv's own pipeline centre-crops to a square and resizes
to 224 (512 for the ResNet): the run's preprocessing (what ``medfm predict`` replays on raw files) is
``resize_mode="crop"`` at ``img_size``, with medfm's usual intensity scaling to [0, 1] (min-max for 8-bit
pictures, where xrv divides by 255: the same for an image that spans 0-255).

Outputs: the classes are the pathology names in xrv's order (``labels=``, or xrv's table for
``weights=NAME`` when torchxrayvision is installed, or xrv's default 18-name list). xrv marks outputs a weight
set never trained with '' (and a NaN operating point); those rows are dropped from the head, and
``imported.source_outputs`` maps each kept class to its xrv output index. xrv's ``op_threshs`` become the
per-label thresholds: medfm's decision ``sigmoid(logit) >= threshold`` is xrv's ``op_norm(...) >= 0.5``.
A label without an operating point gets 0.5.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfm.errors import ConfigError, InputError
from medfm.models.formats import register_format, source_record
from medfm.models.formats.radimagenet import (
    load_strict,
    peek_shapes,
    read_state_dict,
    self_check,
    strip_prefixes,
    tv_resnet_arch,
    tv_resnet_names,
)

# xrv.datasets.default_pathologies: the order of the 18 outputs every xrv classifier shares.
XRV_PATHOLOGIES = [
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion",
    "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
]  # fmt: skip
# xrv's release file names (pickled DenseNets, state-dict ResNet): claimed so the refusal explains itself.
_RELEASE_NAME = re.compile(r"-d121-tw-|densenet121-res224|resnet50-test512|resnet50-res512", re.I)
_RECIPE = ("re-save it as a state dict in torchxrayvision: python -c \"import torch, torchxrayvision as xrv; "
           "m = xrv.models.DenseNet(weights='densenet121-res224-all'); torch.save(m.state_dict(), "
           "'xrv-densenet121-all.pt')\" (use your weight set's name)")


def _densenet_keys(names: Any) -> bool:
    return all(k in names for k in ("features.conv0.weight", "features.norm5.weight", "classifier.weight"))


def _xrv_layout(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """'densenet' or 'resnet' when the keys are an xrv classifier, else None."""
    names = strip_prefixes(list(shapes), keep=("op_threshs",))
    plain = {v: shapes[k] for k, v in names.items()}
    if _densenet_keys(plain):
        # torchvision's ImageNet DenseNet has an RGB stem; xrv's takes one channel (or says op_threshs)
        return "densenet" if "op_threshs" in plain or plain["features.conv0.weight"][1] == 1 else None
    tv = tv_resnet_names(list(shapes), keep=("op_threshs",))
    if tv is None or "fc.weight" not in tv.values():
        return None
    by_tv = {v: shapes[k] for k, v in tv.items()}
    if "op_threshs" in shapes or (by_tv["conv1.weight"][1] == 1 and by_tv["fc.weight"][0] == 18):
        return "resnet"
    return None


def detect(path: Path) -> bool:
    """xrv's DenseNet / ResNet state-dict keys, or one of xrv's release file names."""
    if path.is_file() and _RELEASE_NAME.search(path.name):
        return True
    shapes = peek_shapes(path)
    return bool(shapes) and _xrv_layout(shapes) is not None


def _parse_labels(labels: Any) -> list[str]:
    if isinstance(labels, str):
        return [s.strip() for s in labels.split(",")]
    return [str(s).strip() for s in labels]


def _weight_table(weights: str) -> dict[str, Any]:
    """xrv's own entry (labels, op_threshs) for a weight-set name; needs torchxrayvision installed."""
    try:
        from torchxrayvision.models import model_urls
    except ImportError:
        raise ConfigError(f"weights={weights!r} reads xrv's label table, which needs torchxrayvision "
                          "installed; give the labels instead (labels='Atelectasis,...')") from None
    if weights not in model_urls:
        raise ConfigError(f"unknown xrv weight set {weights!r}; known: {', '.join(sorted(model_urls))}")
    return model_urls[weights]


def _outputs(k: int, labels: Any, weights: str | None, op: torch.Tensor | None
             ) -> tuple[list[str], list[float] | None, str]:
    """(a name per xrv output, '' = untrained; operating points or None; where the names came from)."""
    if labels is not None:
        names, origin = _parse_labels(labels), "labels option"
    elif weights:
        table = _weight_table(weights)
        names, origin = list(table["labels"]), f"torchxrayvision weights {weights}"
        if op is None and table.get("op_threshs") is not None:
            op = torch.tensor([float(v) for v in table["op_threshs"]], dtype=torch.float32)
    elif k == len(XRV_PATHOLOGIES):
        names, origin = list(XRV_PATHOLOGIES), "xrv default pathologies"
        if op is not None and op.numel() == k:
            # A weight set trained on fewer labels leaves NaN operating points where xrv names the output
            # '' (every DenseNet weight set): with the default names, NaN marks an untrained output.
            names = ["" if math.isnan(float(t)) else n for n, t in zip(names, op.tolist())]
    else:
        raise ConfigError(f"the checkpoint has {k} outputs, not xrv's 18: name them with labels='a,b,...'")
    if len(names) != k:
        raise ConfigError(f"{len(names)} labels for a checkpoint with {k} outputs ({origin})")
    kept = [n for n in names if n]
    if len(set(kept)) != len(kept):
        raise ConfigError(f"duplicate label names: {kept}")
    ops = None
    if op is not None:
        if op.numel() != k:
            raise ConfigError(f"op_threshs has {op.numel()} values for {k} outputs")
        ops = [float(t) for t in op.float().tolist()]
    return names, ops, origin


@register_format("xrv", detect,
                 "torchxrayvision DenseNet-121 / ResNet-50 chest X-ray classifier state dict -> classifier",
                 kind="classifier")
def convert(src: Path, out: Path, labels: Any = None, weights: str | None = None,
            img_size: int | None = None) -> Path:
    """An xrv classifier state dict -> classifier run (task multilabel, xrv's pathology classes).

    ``labels``: the output names in xrv's order ('' for an untrained output); ``weights``: an xrv weight-set
    name whose labels (and operating points, when the file has none) torchxrayvision's table gives;
    ``img_size``: medfm's input size (default xrv's: 224 DenseNet, 512 ResNet).
    """
    from medfm.data.preprocess import make_spec
    from medfm.models.densenet import XRV_MEAN, XRV_STD, tv_resnet_name
    from medfm.models.registry import create_encoder
    from medfm.tasks.adapt.classifier import Classifier, save_classifier

    if src.is_dir():
        raise InputError(src, "expected one xrv weights file (.pt/.pth/.safetensors), got a folder")
    sd = read_state_dict(src, _RECIPE)
    op = sd.pop("op_threshs", None)
    names = strip_prefixes(list(sd))
    plain = {names[k]: v for k, v in sd.items()}
    norm = dict(mean=XRV_MEAN, std=XRV_STD)
    if _densenet_keys(plain):
        arch = _densenet_arch(plain)
        enc = create_encoder("densenet121", img_size=int(img_size or 224), **arch, **norm)
        trunk = {k: v for k, v in plain.items() if k.startswith("features.")}
        head_w, head_b = plain.pop("classifier.weight"), plain.pop("classifier.bias")
        network = "DenseNet"
    else:
        tv_names = tv_resnet_names(list(sd))
        if tv_names is None or "fc.weight" not in tv_names.values():
            raise InputError(src, "not a torchxrayvision DenseNet or ResNet state dict (expected "
                                  f"features.*/classifier.* or conv1/layer1-4/fc keys; found "
                                  f"{', '.join(list(sd)[:3])}...)")
        tv = {tv_names[k]: v for k, v in sd.items()}
        a = tv_resnet_arch({k: tuple(v.shape) for k, v in tv.items()})
        name = tv_resnet_name(a["block"], a["layers"])
        enc = create_encoder(name, in_chans=a["in_chans"], img_size=int(img_size or 512), block=a["block"],
                             layers=a["layers"], **norm)
        head_w, head_b = tv.pop("fc.weight"), tv.pop("fc.bias")
        trunk, network, arch = tv, "ResNet", a
    if network == "DenseNet":  # the ResNet's keys were all matched by tv_resnet_names
        leftover = sorted(set(plain) - set(trunk))
        if leftover:
            raise InputError(src, f"{len(leftover)} unplaced key(s): {', '.join(leftover[:4])}")
    load_strict(enc, trunk, src)
    k = head_w.shape[0]
    out_names, ops, origin = _outputs(k, labels, weights, op)
    keep = [i for i, n in enumerate(out_names) if n]
    if not keep:
        raise ConfigError("every output is unnamed (untrained); give labels='a,b,...'")
    head = nn.Linear(head_w.shape[1], len(keep))
    with torch.no_grad():
        head.weight.copy_(head_w[keep].float())
        head.bias.copy_(head_b[keep].float())
    thresholds = [ops[i] if ops is not None and math.isfinite(ops[i]) else 0.5 for i in keep]
    # xrv's pipeline centre-crops to a square (XRayCenterCrop) before resizing: raw files replay that.
    prep = make_spec(size=int(enc.img_size[-1]), resize_mode="crop", channels=1)
    clf = Classifier(enc, head, "multilabel", [out_names[i] for i in keep], thresholds, prep, "imported")
    diff, ref = _parity(clf, network, arch, trunk, head_w, head_b, keep)
    rule = ("xrv op_threshs (operating points; sigmoid >= t is xrv's op_norm >= 0.5)" if ops is not None
            else "none in the checkpoint: 0.5 (pass weights=NAME for xrv's operating points)")
    no_point = [out_names[i] for i in keep if ops is not None and not math.isfinite(ops[i])]
    dropped = [i for i in range(k) if i not in keep]
    source = source_record(src, "xrv", network=f"torchxrayvision {network}", labels_from=origin,
                           source_outputs=keep, dropped_untrained_outputs=dropped,
                           input_scaling="2048 x - 1024 ([0, 1] -> xrv's [-1024, 1024])")
    if no_point:
        source["no_operating_point"] = no_point
    metrics = {"parity_reference": ref, "parity_max_abs_diff": diff}
    return save_classifier(clf, out, threshold_rule=rule, metrics=metrics, extra={"imported": source}).path


def _densenet_arch(plain: dict[str, torch.Tensor]) -> dict[str, Any]:
    """DenseNet hyper-parameters read off the shapes (xrv only ships DenseNet-121, but any fits)."""
    conv0 = plain["features.conv0.weight"]
    growth = plain["features.denseblock1.denselayer1.conv2.weight"].shape[0]
    bottleneck = plain["features.denseblock1.denselayer1.conv1.weight"].shape[0]
    blocks = tuple(len({n.split(".")[2] for n in plain if n.startswith(f"features.denseblock{i}.")})
                   for i in range(1, 5))
    if any(b == 0 for b in blocks) or any(n.startswith("features.denseblock5.") for n in plain):
        raise ValueError(f"expected 4 dense blocks, found layers per block {list(blocks)}")
    return {"in_chans": int(conv0.shape[1]), "growth_rate": int(growth), "block_config": blocks,
            "num_init_features": int(conv0.shape[0]), "bn_size": int(bottleneck // growth)}


def _parity(clf: Any, network: str, arch: dict[str, Any], trunk: dict[str, torch.Tensor],
            head_w: torch.Tensor, head_b: torch.Tensor, keep: list[int]) -> tuple[float, str]:
    """Max |medfm logits - source logits| (kept outputs) on two random images: against torchxrayvision's
    DenseNet when it is installed, else (and for the ResNet, which xrv cannot build without downloading)
    against torchvision's network that xrv wraps."""
    ref: nn.Module
    if network == "DenseNet":
        try:
            import torchxrayvision as xrv

            ref = xrv.models.DenseNet(num_classes=head_w.shape[0], in_channels=arch["in_chans"],
                                      growth_rate=arch["growth_rate"], block_config=arch["block_config"],
                                      num_init_features=arch["num_init_features"], bn_size=arch["bn_size"])
            name = f"torchxrayvision {getattr(xrv, '__version__', '?')} DenseNet"
        except ImportError:
            from torchvision.models.densenet import DenseNet as TVDenseNet

            ref = TVDenseNet(arch["growth_rate"], arch["block_config"], arch["num_init_features"],
                             arch["bn_size"], num_classes=head_w.shape[0])
            ref.features.conv0 = nn.Conv2d(arch["in_chans"], arch["num_init_features"], 7, 2, 3, bias=False)
            name = "torchvision DenseNet (torchxrayvision not installed)"
        sd = {**trunk, "classifier.weight": head_w, "classifier.bias": head_b}
    else:
        from medfm.models.formats.radimagenet import _torchvision_reference

        ref = _torchvision_reference(arch, trunk)
        ref.fc = nn.Linear(head_w.shape[1], head_w.shape[0])
        sd = {**trunk, "fc.weight": head_w, "fc.bias": head_b}
        name = "torchvision ResNet with a 1-channel stem (what xrv.models.ResNet wraps)"
    ref.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    logits = nn.Sequential(clf.encoder, clf.head)  # the classifier minus its resize to img_size
    diff = self_check(logits, _Rows(ref, keep), lambda x: x * 2048 - 1024)
    return diff, f"{name} on 2048 x - 1024 (2 random images)"


class _Rows(nn.Module):
    """The source network's logits at the kept output rows."""

    def __init__(self, net: nn.Module, keep: list[int]) -> None:
        super().__init__()
        self.net, self.keep = net, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, self.keep]
