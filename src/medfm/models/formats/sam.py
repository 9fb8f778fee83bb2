"""Format ``sam``: an official SAM / MedSAM ViT checkpoint (.pth / .safetensors) -> a promptable run."""

from __future__ import annotations

from pathlib import Path

from medfm.models.formats import register_format, source_record

_KEYS = ("image_encoder.patch_embed.proj.weight", "prompt_encoder.", "mask_decoder.")


def _keys(path: Path) -> list[str]:
    from medfm.models.formats.sniff import weight_keys

    return weight_keys(path)


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    keys = _keys(path)
    return _KEYS[0] in keys and any(k.startswith(_KEYS[1]) for k in keys) and not any(
        k.startswith("image_encoder.trunk.") for k in keys
    )


@register_format("sam", detect, "SAM / MedSAM ViT checkpoint (image encoder + prompt encoder + mask decoder)",
                 kind="promptable")
def convert(src: Path, out: Path, decoder_heads: int = 8) -> Path:
    """Every key placed (or an InputError naming the ones that do not fit); the inferred config stored."""
    from medfm.models.seg.sam import load_sam_checkpoint
    from medfm.tasks.segment.runs import save_run

    model, report = load_sam_checkpoint(src, decoder_heads=decoder_heads)
    conf = {"model": model.config, "img_size": model.img_size,
            "imported": source_record(src, "sam", keys_loaded=report["keys_loaded"])}
    return save_run(model, "promptable", conf, out)
