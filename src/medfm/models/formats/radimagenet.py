"""RadImageNet-style ResNet state dicts -> a medfm encoder run (``tv_resnet50``, torchvision's ResNet).

RadImageNet's PyTorch weights are a torchvision ResNet-50 trunk, saved either with torchvision's names
(``conv1``, ``bn1``, ``layer1``-``layer4``, maybe ``fc``) or, as in RadImageNet's own PyTorch example, as
``nn.Sequential(*list(resnet50().children())[:9])`` under ``backbone.`` (keys ``backbone.0.weight``,
``backbone.4.0.conv1.weight``...). Both load, with or without ``module.`` / ``model.`` / ``backbone.``
prefixes; the depth (18-152) and block type are read off the keys. The ``fc`` (a classifier, if present) is
not part of an encoder and is dropped; the run's config says so.

Input: medfm's [0, 1] grey image is repeated to RGB and normalised with ``mean`` / ``std`` (default the
ImageNet values RadImageNet's PyTorch ports use; ``mean="none"`` turns normalisation off) inside the encoder.

Detection claims any torchvision-ResNet layout (this format is tried after the specific ones), except files
that carry torchxrayvision's signature and files beside a timm ``config.json``. The helpers at the bottom
(key layout, strict loading, cheap shape peek) are shared with the ``xrv`` format.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medfm.errors import ConfigError, InputError, MedfmError
from medfm.models.checkpoint import REFUSED, read_safetensors, read_torch_weights, state_dict_from
from medfm.models.formats import register_format, source_record

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "resnet.", "net.")
# nn.Sequential(*list(resnet.children())[:9]) numbers the children: 2 relu, 3 maxpool, 8 avgpool (no weights)
_SEQ_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_TV_KEY = re.compile(r"^(conv1\.|bn1\.|layer[1-4]\.\d+\.|fc\.)")
_RECIPE = ("re-save it as a plain state dict in the library that wrote it, e.g. "
           "torch.save(model.state_dict(), 'resnet50_state.pt')")


# ---------------------------------------------------------------- shared helpers (also used by xrv)


def peek_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape of one weights file (safetensors: the header only), or None when it is not a
    readable weights file (a medfm file, a folder, a pickle that needs code...)."""
    if not path.is_file() or path.suffix not in WEIGHT_SUFFIXES:
        return None
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                if "medfm_encoder" in (f.metadata() or {}):
                    return None  # already a medfm checkpoint
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        sd = state_dict_from(read_torch_weights(path), path)
    except (MedfmError, OSError, ValueError, RuntimeError):
        return None
    except Exception:  # safetensors raises its own error types for a foreign or truncated file
        return None
    return {k: tuple(v.shape) for k, v in sd.items()}


def read_state_dict(path: Path, recipe: str) -> dict[str, torch.Tensor]:
    """The flat state dict of ``path``; a pickle that needs code is refused with ``recipe`` appended."""
    try:
        if path.suffix == ".safetensors":
            return read_safetensors(path)[0]
        return state_dict_from(read_torch_weights(path), path)
    except InputError as e:
        if e.problem == REFUSED:
            raise InputError(path, f"{REFUSED}; {recipe}") from None
        raise


def strip_prefixes(names: Sequence[str], keep: Sequence[str] = ()) -> dict[str, str]:
    """Original name -> name without the wrapper prefixes every key shares (``keep`` names are left as is)."""
    out = {k: k for k in names}
    for _ in range(len(_PREFIXES)):  # nested wrappers: module.backbone.*
        body = [v for k, v in out.items() if k not in keep]
        hit = next((p for p in _PREFIXES if body and all(v.startswith(p) for v in body)), None)
        if hit is None:
            break
        out = {k: (v if k in keep else v[len(hit):]) for k, v in out.items()}
    return out


def tv_resnet_names(names: Sequence[str], keep: Sequence[str] = ()) -> dict[str, str] | None:
    """Original name -> torchvision ResNet name, or None when the keys are not a torchvision ResNet trunk.

    Accepts torchvision's names and the ``nn.Sequential(*children)`` numbering, under any wrapper prefix."""
    mapping = strip_prefixes(names, keep)
    out = {}
    for k, v in mapping.items():
        if k in keep:
            continue
        head, _, rest = v.partition(".")
        if head in _SEQ_NAMES and rest:
            v = f"{_SEQ_NAMES[head]}.{rest}"
        if not _TV_KEY.match(v):
            return None
        out[k] = v
    tv = set(out.values())
    if "conv1.weight" not in tv or "bn1.running_mean" not in tv:
        return None
    if not all(any(n.startswith(f"layer{i}.0.") for n in tv) for i in range(1, 5)):
        return None
    return out


def tv_resnet_arch(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """block, layers, in_chans and fc outputs (None without fc) of torchvision-named ResNet shapes."""
    block = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
    layers = tuple(len({n.split(".")[1] for n in shapes if n.startswith(f"layer{i}.")}) for i in range(1, 5))
    conv1 = shapes["conv1.weight"]
    if len(conv1) != 4 or conv1[0] != 64:
        raise ValueError(f"conv1.weight has shape {list(conv1)}; torchvision's ResNet stem is (64, C, 7, 7)")
    fc = shapes.get("fc.weight")
    return {"block": block, "layers": layers, "in_chans": int(conv1[1]),
            "fc_out": int(fc[0]) if fc is not None else None}


def load_strict(enc: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``sd`` into ``enc``: every encoder key must come from the checkpoint (BatchNorm's
    ``num_batches_tracked`` counters, which some exports drop, excepted) with the same shape; InputError
    naming the keys otherwise."""
    target = enc.state_dict()
    unexpected = sorted(set(sd) - set(target))
    missing = sorted(k for k in set(target) - set(sd) if not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        what = [f"{len(unexpected)} unplaced key(s): {', '.join(unexpected[:4])}"] if unexpected else []
        what += [f"{len(missing)} missing key(s): {', '.join(missing[:4])}"] if missing else []
        raise InputError(path, f"weights do not fit {enc.config.get('name')} ({'; '.join(what)})")
    full = {}
    for k, want in target.items():
        v = sd.get(k, want)
        if v.shape != want.shape:
            raise InputError(path, f"shape mismatch for '{k}': checkpoint {list(v.shape)} "
                                   f"vs model {list(want.shape)}")
        full[k] = v.to(want.dtype)
    enc.load_state_dict(full, strict=True)


def float_list(value: Any, what: str) -> list[float] | None:
    """A list of floats from a list or a comma-separated string; None for None / "none"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be numbers (a list or 'a,b,c'), got {value!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{what} must be finite numbers, got {value!r}")
    return out


@torch.no_grad()
def self_check(enc: torch.nn.Module, reference: torch.nn.Module, to_reference: Any, side: int = 64) -> float:
    """Max |enc(x) - reference(to_reference(x))| on two random [0, 1] grey images of ``side`` px."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, side, side, generator=g)
    return float((enc.eval()(x) - reference.eval()(to_reference(x))).abs().max())


# ---------------------------------------------------------------- the format


def _beside_timm_config(path: Path) -> bool:
    """A timm hub download (config.json with an 'architecture') belongs to the timm format."""
    cfg = path.parent / "config.json"
    try:
        conf = json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, ValueError):
        return False
    return isinstance(conf, dict) and ("architecture" in conf or "pretrained_cfg" in conf)


def _xrv_signature(shapes: dict[str, tuple[int, ...]], names: dict[str, str]) -> bool:
    """torchxrayvision's ResNet: an op_threshs buffer, or a 1-channel stem with its 18 pathology outputs."""
    if "op_threshs" in shapes:
        return True
    tv = {names[k]: s for k, s in shapes.items() if k in names}
    return tv.get("conv1.weight", (0, 0))[1] == 1 and tv.get("fc.weight", (0,))[0] == 18


def detect(path: Path) -> bool:
    """A single weights file whose keys are a torchvision ResNet trunk (any prefix), or a file named like
    RadImageNet's Keras release (refused with a pointer to the PyTorch weights)."""
    if path.is_file() and path.suffix in (".h5", ".hdf5") and "radimagenet" in path.name.lower():
        return True
    if _beside_timm_config(path):
        return False
    shapes = peek_shapes(path)
    if not shapes:
        return False
    names = tv_resnet_names(list(shapes), keep=("op_threshs",))
    return names is not None and not _xrv_signature(shapes, names)


@register_format("radimagenet", detect,
                 "RadImageNet-style ResNet state dict (torchvision layout, .pt/.pth/.safetensors) -> encoder",
                 kind="encoder")
def convert(src: Path, out: Path, mean: Any = "imagenet", std: Any = "imagenet",
            img_size: int = 224) -> Path:
    """A torchvision-layout ResNet state dict -> encoder run (``tv_resnet*``), fc dropped.

    ``mean`` / ``std``: the input normalisation applied inside the encoder after repeating grey to RGB
    (default ImageNet's for a 3-channel stem; "none" for none). ``img_size``: the input size medfm resizes to.
    """
    from medfm.models.densenet import IMAGENET_MEAN, IMAGENET_STD, tv_resnet_name
    from medfm.models.formats.runs import write_encoder_run
    from medfm.models.registry import create_encoder

    if src.suffix in (".h5", ".hdf5"):
        raise InputError(src, "Keras HDF5 weights are not read; use RadImageNet's PyTorch weights "
                              "(a .pt state dict of the ResNet-50 backbone)")
    if src.is_dir():
        raise InputError(src, "expected one weights file (.pt/.pth/.bin/.safetensors), got a folder")
    sd = read_state_dict(src, _RECIPE)
    names = tv_resnet_names(list(sd))
    if names is None:
        raise InputError(src, "not a torchvision ResNet state dict (expected conv1/bn1/layer1-4 keys, "
                              f"found {', '.join(list(sd)[:3])}...)")
    tv = {names[k]: v for k, v in sd.items()}
    arch = tv_resnet_arch({k: tuple(v.shape) for k, v in tv.items()})
    fc = {k: tv.pop(k) for k in [k for k in tv if k.startswith("fc.")]}
    in_chans = arch["in_chans"]
    m = IMAGENET_MEAN if isinstance(mean, str) and mean.lower() == "imagenet" else float_list(mean, "mean")
    s = IMAGENET_STD if isinstance(std, str) and std.lower() == "imagenet" else float_list(std, "std")
    if (m is IMAGENET_MEAN or s is IMAGENET_STD) and in_chans != 3:
        m = s = None  # ImageNet statistics are per RGB channel; a grey stem gets no default normalisation
    name = tv_resnet_name(arch["block"], arch["layers"])
    enc = create_encoder(name, in_chans=in_chans, img_size=int(img_size), block=arch["block"],
                         layers=arch["layers"], mean=tuple(m) if m else None, std=tuple(s) if s else None)
    load_strict(enc, tv, src)
    diff = self_check(enc, _torchvision_reference(arch, tv), lambda x: enc.prepare_input(x))
    source = source_record(src, "radimagenet", architecture=name,
                           dropped=f"fc ({arch['fc_out']} outputs)" if fc else "nothing",
                           normalisation=f"mean={list(m)}, std={list(s)}" if m else "none")
    metrics = {"parity_reference": "torchvision ResNet trunk + global average pool (2 random images)",
               "parity_max_abs_diff": diff}
    return write_encoder_run(enc, out, source, metrics)


def _torchvision_reference(arch: dict[str, Any], tv: dict[str, torch.Tensor]) -> torch.nn.Module:
    """torchvision's own ResNet with the weights, ending in the pooled features (fc = identity)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    net = ResNet(Bottleneck if arch["block"] == "bottleneck" else BasicBlock, list(arch["layers"]))
    net.conv1 = torch.nn.Conv2d(arch["in_chans"], 64, 7, 2, 3, bias=False)
    net.fc = torch.nn.Identity()
    net.load_state_dict({k: v.float() for k, v in tv.items()}, strict=False)  # absent counters stay 0
    return net
