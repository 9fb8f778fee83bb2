"""Format ``timm``: a bare timm ViT / ConvNeXt state dict (.safetensors / .pth / .bin), e.g. a DINO, MAE or
RAD-DINO-style timm checkpoint -> an encoder run (exact: converters in medfm.models.convert)."""

from __future__ import annotations

from pathlib import Path

from medfm.models.formats import register_format, source_record
from medfm.models.formats.sniff import weight_keys


def detect(path: Path) -> bool:
    from medfm.models.convert import _strip_prefixes

    keys = weight_keys(path)
    if not keys:
        return False
    stripped = _strip_prefixes(dict.fromkeys(keys))  # type: ignore[arg-type]
    if "patch_embed.proj.weight" in stripped and "pos_embed" in stripped:
        return True
    return "stem.0.weight" in stripped and any(k.startswith("stages.") for k in stripped)


@register_format("timm", detect, "timm ViT / ConvNeXt state dict (.safetensors, .pth, .bin)", kind="encoder")
def convert(src: Path, out: Path, arch: str | None = None, in_chans: int | None = None,
            img_size: int | None = None) -> Path:
    from medfm.models.formats.runs import write_encoder_run
    from medfm.models.io import load_encoder

    overrides = {k: v for k, v in dict(in_chans=in_chans, img_size=img_size).items() if v is not None}
    enc = load_encoder(src, arch=arch, **overrides)
    return write_encoder_run(enc, out, source_record(src, "timm", arch=arch))
