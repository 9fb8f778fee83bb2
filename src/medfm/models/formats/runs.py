"""Writing imported models as medfm run directories (the one writer, medfm.rundir.RunDir)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfm.models.base import Encoder


def write_encoder_run(
    enc: Encoder, out: str | Path, source: dict[str, Any], metrics: dict[str, Any] | None = None
) -> Path:
    """An encoder run (kind "encoder"): model.safetensors with the config in its header, config.json whose
    ``imported`` block names the source format and file, metrics.json (e.g. the parity check) and README.md.
    Loads with ``medfm.load_run`` / ``medfm.load_encoder`` and every command that takes an encoder."""
    from medfm.models.io import WEIGHTS_NAME, save_encoder
    from medfm.rundir import RunDir

    run = RunDir(out, kind="encoder")
    run.path.mkdir(parents=True, exist_ok=True)
    save_encoder(enc, run.path / WEIGHTS_NAME)  # the run's file, whatever the folder is called
    run.write_config({"encoder": enc.config, "imported": source,
                      "preprocessing": default_preprocessing(enc.img_size)})
    if metrics:
        run.write_metrics(metrics, merge=False)
    run.write_card()
    return run.path


def default_preprocessing(img_size: Any) -> dict[str, Any]:
    """medfm's default raw-image preprocessing at the model's input size: an imported model was not trained
    on a medfm store, so inference and adaptation read raw files this way (the model's own intensity
    normalisation happens inside it)."""
    from medfm.data.preprocess import make_spec

    size = img_size[-1] if isinstance(img_size, list | tuple) else img_size
    return make_spec(size=int(size))


def imported_lines(config: dict[str, Any]) -> str:
    """Model-card text naming where an imported model's weights came from ('' for trained runs)."""
    src = config.get("imported")
    if not isinstance(src, dict):
        return ""
    extra = ", ".join(f"{k}={v}" for k, v in src.items() if k not in ("format", "file"))
    return (
        f"Imported with `medfm models import` from a **{src.get('format')}** checkpoint "
        f"`{src.get('file')}`{f' ({extra})' if extra else ''}. The weights are the source model's; its "
        "training data, licence and intended use are those of the source model's own card.\n"
    )
