"""Format ``sam2``: an official SAM 2 / SAM 2.1 / MedSAM2 checkpoint -> a promptable run (single image).

The file is ``{"model": state_dict}`` (``.pt``, read weights-only) or the same state dict as safetensors:
Hiera trunk + FPN neck (``image_encoder.trunk.*`` / ``image_encoder.neck.*``), ``sam_prompt_encoder.*``,
``sam_mask_decoder.*``, ``no_mem_embed`` and the video-only memory modules. The run holds the memory-free
single-image model (:class:`medfm.models.seg.sam2.Sam2Promptable`); the memory modules' keys are counted as
skipped in config.json and metrics.json. The architecture is inferred from tensor shapes and, for what shapes
do not show (heads, global-attention blocks, window sizes), from the official config of the same size;
config.json stores all of it, so the run rebuilds without the original file.

Options: ``img_size`` (default 1024; 512 for a file named like MedSAM2), ``num_heads``,
``global_att_blocks``, ``window_spec`` (required for a non-official Hiera size), ``q_pool``,
``fpn_top_down_levels``, ``decoder_heads``, ``iou_prediction_use_sigmoid``, ``dynamic_multimask``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfm.models.formats import register_format, source_record

_TRUNK = "image_encoder.trunk.patch_embed.proj.weight"
# A SAM 2 .pt that the weights-only reader refuses (a full pickled model) can be re-saved in the sam2 library.
RECIPE = ("re-save it as a plain state dict in the sam2 library: "
          "torch.save({'model': model.state_dict()}, 'sam2_plain.pt')")


def detect(path: Path) -> bool:
    """A weights file with a Hiera trunk and SAM 2's prompt encoder / mask decoder key names."""
    from medfm.models.formats.sniff import weight_keys

    if not path.is_file():
        return False
    keys = weight_keys(path)
    return _TRUNK in keys and any(k.startswith("sam_mask_decoder.") for k in keys) and any(
        k.startswith("sam_prompt_encoder.") for k in keys
    )


def _read(src: Path) -> dict[str, Any]:
    from medfm.errors import InputError
    from medfm.models.checkpoint import REFUSED, read_weights

    try:
        return read_weights(src)
    except InputError as e:
        if e.problem == REFUSED:
            raise InputError(src, f"{REFUSED}; {RECIPE}") from None
        raise


def read_sam2_file(src: Path, **options: Any) -> tuple[Any, dict[str, Any]]:
    """(Sam2Promptable, import report) of an official SAM 2 file, without writing a run."""
    from medfm.errors import InputError
    from medfm.models.seg.sam2 import load_sam2_state

    sd = _read(src)
    if _TRUNK not in sd:
        raise InputError(src, f"not a SAM 2 checkpoint: missing key '{_TRUNK}'")
    return load_sam2_state(sd, src, src.name, **options)


@register_format("sam2", detect, "SAM 2 / SAM 2.1 / MedSAM2 checkpoint (Hiera + SAM 2 heads; single-image "
                 "path, memory modules skipped)", kind="promptable")
def convert(src: Path, out: Path, **options: Any) -> Path:
    """Every key placed except the memory modules' (counted); the inferred config stored in config.json."""
    from medfm.data.preprocess import make_spec
    from medfm.rundir import RunDir
    from medfm.tasks.segment.runs import save_run

    model, report = read_sam2_file(src, **options)
    imported = source_record(src, "sam2", keys_loaded=report["keys_loaded"],
                             keys_skipped=report["keys_skipped"], skipped_modules=report["skipped_modules"])
    # SAM 2's own transform stretches every image to the square input (SAM2Transforms: Resize((S, S)))
    conf = {"model": model.config, "img_size": model.img_size, "imported": imported,
            "inferred_from": report["inferred_from"],
            "preprocessing": make_spec(size=model.img_size, resize_mode="stretch")}
    run = save_run(model, "promptable", conf, out)
    rd = RunDir(run, kind="promptable")
    rd.write_metrics(
        {"import": {"keys_loaded": report["keys_loaded"], "keys_skipped": report["keys_skipped"],
                    "skipped_modules": report["skipped_modules"],
                    "skipped_reason": "SAM 2 memory / video modules, unused for a single image"}}
    )
    rd.write_card()  # again, now that metrics.json exists
    return run
