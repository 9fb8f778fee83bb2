"""Format ``hf``: a Hugging Face model folder (config.json + model.safetensors / pytorch_model.bin).

- ViT / DINOv2 (e.g. RAD-DINO): medfm's own ViT, converted key by key (medfm.models.convert, exact);
- Swin / ConvNeXt / ResNet / CLIP-vision / SigLIP-vision (AutoModel configs, incl. *ForImageClassification
  folders whose head is dropped): the ``hf_vision`` encoder, weights read by transformers itself;
- CLIP / SigLIP vision-text folders: a medfm CLIP run (medfm.models.formats.hf_clip), or with
  ``vision_only=True`` just the image tower as an encoder run.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from medfm.errors import InputError
from medfm.models.formats import register_format, source_record
from medfm.models.formats.sniff import read_config

_NATIVE = ("vit", "dinov2", "dinov2_with_registers")
_COMPOSITE = ("clip", "siglip", "siglip2")


def detect(path: Path) -> bool:
    from medfm.models.hf_vision import supported

    cfg = read_config(path) if path.is_dir() else None
    if not cfg:
        return False
    return cfg.get("model_type") in _NATIVE + _COMPOSITE or supported(cfg)


def _weights_file(path: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise InputError(path, "Hugging Face folder has no model.safetensors or pytorch_model.bin "
                           "(sharded checkpoints: merge them with save_pretrained(max_shard_size='100GB'))")


def hf_vision_from_folder(path: Path, hf_cfg: dict[str, Any], img_size: int | None, in_chans: int,
                          pixel_mean: Any = None, pixel_std: Any = None) -> tuple[Any, dict[str, Any]]:
    """An hf_vision encoder with the folder's backbone weights (read by transformers; heads dropped)."""
    from transformers import AutoModel

    from medfm.models.hf_vision import HFVisionEncoder, vision_config
    from medfm.models.registry import create_encoder

    vc = vision_config(hf_cfg)
    # The full resolved config (library defaults filled in) so the run rebuilds under another version.
    probe = HFVisionEncoder(vc, in_chans=in_chans)
    full = probe.model.config.to_dict()
    full["model_type"] = vc["model_type"]
    pre = _preprocessor(path)
    mean = pixel_mean if pixel_mean is not None else pre.get("image_mean")
    std = pixel_std if pixel_std is not None else pre.get("image_std")
    size = img_size or int(full.get("image_size") or _pre_size(pre) or 224)
    kw: dict[str, Any] = {"hf_config": full, "in_chans": in_chans, "img_size": size}
    if mean is not None:
        kw["pixel_mean"] = [float(v) for v in mean]
    if std is not None:
        kw["pixel_std"] = [float(v) for v in std]
    enc = create_encoder("hf_vision", **kw)
    _weights_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src_model, info = AutoModel.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True
        )
        if hf_cfg.get("model_type") in _COMPOSITE:  # the vision half of a vision-text model
            src_model = src_model.vision_model
    missing = [k for k in info.get("missing_keys", []) if "pooler" not in k]
    if missing:
        raise InputError(path, f"{len(missing)} backbone weight(s) missing from the folder: {missing[:4]}")
    sd = src_model.state_dict()
    own = enc.model.state_dict()
    if set(sd) != set(own):
        diff = sorted(set(sd) ^ set(own))[:4]
        raise InputError(path, f"backbone keys do not match the rebuilt network: {diff}")
    enc.model.load_state_dict(sd, strict=True)
    dropped = list(info.get("unexpected_keys", []))
    return enc.eval(), {"keys_loaded": len(sd), "head_keys_dropped": len(dropped)}


def _preprocessor(path: Path) -> dict[str, Any]:
    return read_config(path, "preprocessor_config.json") or {}


def _pre_size(pre: dict[str, Any]) -> int | None:
    s = pre.get("crop_size") or pre.get("size")
    if isinstance(s, dict):
        s = s.get("height") or s.get("shortest_edge")
    return int(s) if isinstance(s, int | float) else None


@register_format("hf", detect, "Hugging Face folder: ViT/DINOv2 (RAD-DINO), Swin, ConvNeXt, ResNet, "
                 "CLIP / SigLIP (vision-text or vision only)", kind="encoder")
def convert(src: Path, out: Path, img_size: int | None = None, in_chans: int = 1, vision_only: bool = False,
            pixel_mean: Any = None, pixel_std: Any = None, **options: Any) -> Path:
    from medfm.models.formats.runs import write_encoder_run

    if not src.is_dir():
        raise InputError(src, "a Hugging Face model is a folder with config.json")
    cfg = read_config(src)
    if not cfg:
        raise InputError(src, "no readable config.json")
    mt = cfg.get("model_type")
    if mt in _COMPOSITE and not vision_only:
        from medfm.models.formats.hf_clip import convert_hf_clip

        return convert_hf_clip(src, out, cfg, img_size=img_size, in_chans=in_chans, **options)
    if options:
        raise InputError(src, f"options {sorted(options)} do not apply to a {mt} vision folder")
    if mt in _NATIVE:
        from medfm.models.convert import load_hf_dir

        overrides = {k: v for k, v in dict(img_size=img_size).items() if v is not None}
        if in_chans:
            overrides["in_chans"] = in_chans
        enc = load_hf_dir(src, **overrides)
        return write_encoder_run(enc, out, source_record(src, "hf", model_type=mt))
    enc, report = hf_vision_from_folder(src, cfg, img_size, in_chans, pixel_mean, pixel_std)
    return write_encoder_run(enc, out, source_record(src, "hf", model_type=mt), metrics=report)
