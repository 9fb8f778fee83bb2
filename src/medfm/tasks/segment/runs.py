"""Run directories of the three segmentation kinds and their loaders for ``medfm.load_run``.

kinds: "segmenter" (`segment train`: encoder + dense decoder or a MONAI UNet), "promptable" (`segment
prompt-train`, SAM-style) and "incontext" (`segment incontext`). Each is config.json (enough to rebuild the
model, plus the ``preprocessing`` its training images went through) + ``seg_model.safetensors`` (the
whole model) + ``model.safetensors`` (the encoder alone, so ``medfm.load_encoder`` reads it too). Runs
written before run kinds existed (``"task": "segment" | "segment_prompt" | "segment_incontext"``) still load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from medfm.errors import InputError

WEIGHTS = "seg_model.safetensors"
LEGACY_TASKS = {"segment": "segmenter", "segment_prompt": "promptable", "segment_incontext": "incontext"}


def _run_dir(out: str | Path, kind: str) -> Any:
    from medfm.rundir import RunDir

    return RunDir(out, kind=kind)


def save_run(model: torch.nn.Module, kind: str, conf: dict[str, Any], out: str | Path) -> Path:
    """Write config.json (kind, format version, environment added), the model and its encoder alone."""
    kind = LEGACY_TASKS.get(kind, kind)
    run = _run_dir(out, kind)
    run.write_config(dict(conf))
    meta = {"medfm_segment": json.dumps({"kind": kind, "decoder": conf.get("decoder")})}
    run.write_weights(model, name=WEIGHTS, metadata=meta)
    enc = getattr(model, "encoder", None)
    if enc is not None and getattr(enc, "config", {}).get("name") not in (None, "sam_image_encoder"):
        from medfm.models.io import save_encoder

        save_encoder(enc, run.path)
    run.write_card()
    return Path(out)


def run_config(run: str | Path, kind: str) -> dict[str, Any]:
    """config.json of a segmentation run of `kind` (new runs: "kind"; old ones: "task")."""
    run = Path(run)
    p = run / "config.json"
    if not p.is_file() or not (run / WEIGHTS).is_file():
        what = "segmentation" if kind == "segmenter" else kind
        raise InputError(run, f"not a {what} run directory (needs config.json and {WEIGHTS})")
    try:
        conf = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(p, f"not valid JSON ({e.msg}, line {e.lineno})") from None
    found = conf.get("kind") or LEGACY_TASKS.get(conf.get("task", ""), conf.get("task"))
    if found != kind:
        raise InputError(p, f"run is a '{found}' run, not a '{kind}' run")
    return conf


def preprocessing(conf: dict[str, Any]) -> dict[str, Any]:
    """The spec raw inputs must go through for this run.

    Runs without one (written before specs were recorded) resized manifest images by stretching to their
    ``img_size``: prepare's defaults at that size with ``resize_mode="stretch"``."""
    from medfm.data.preprocess import make_spec

    spec = conf.get("preprocessing")
    if isinstance(spec, dict):
        return make_spec(**{k: v for k, v in spec.items() if k != "version"})
    return make_spec(size=run_img_size(conf) or 224, resize_mode="stretch")


def run_img_size(conf: dict[str, Any]) -> int | None:
    """The square 2D input size of a run (older in-context runs record it only in their encoder config)."""
    for v in (
        conf.get("img_size"),
        (conf.get("model") or {}).get("img_size"),
        (conf.get("encoder") or {}).get("img_size"),
    ):
        if isinstance(v, (list, tuple)) and v:
            v = v[-1]
        if isinstance(v, (int, float)) and v:
            return int(v)
    return None


def _encoder(cfg: dict[str, Any]) -> torch.nn.Module:
    if cfg.get("name") == "sam_image_encoder":
        from medfm.models.seg.sam import SAMImageEncoder

        return SAMImageEncoder(**{k: v for k, v in cfg.items() if k != "name"})
    from medfm.models.registry import create_encoder

    return create_encoder(**cfg)


def _load_weights(model: torch.nn.Module, run: Path) -> torch.nn.Module:
    try:
        sd = load_file(str(run / WEIGHTS))
    except Exception as e:
        raise InputError(
            run / WEIGHTS, f"not a readable safetensors checkpoint ({type(e).__name__})"
        ) from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise InputError(
            run / WEIGHTS, f"weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval()


def load_segmentation_run(run: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, config) of a `segment train` run directory."""
    from medfm.models.seg.registry import build_segmentation_model, monai_unet
    from medfm.tasks.segment.train import unet_channels

    run = Path(run)
    conf = run_config(run, "segmenter")
    if conf["decoder"] == "monai_unet":
        model: torch.nn.Module = monai_unet(
            conf["spatial_dims"], conf["in_chans"], conf["num_classes"], channels=unet_channels(conf["patch"])
        )
    elif conf["decoder"] == "monai_network":  # an imported MONAI bundle: class name + literal args
        from medfm.models.formats.monai_bundle import build_segmenter

        model = build_segmenter(conf["network"])
    else:
        model = build_segmentation_model(
            _encoder(conf["encoder"]), conf["num_classes"], conf["decoder"], conf["feature_size"]
        )
    return _load_weights(model, run), conf


def load_segmenter(path: str | Path) -> torch.nn.Module:
    """The dense segmentation model of a "segmenter" run (for ``medfm.load_run``)."""
    return load_segmentation_run(path)[0]


def load_promptable(path: str | Path) -> torch.nn.Module:
    """A promptable run directory, or an official SAM / MedSAM checkpoint file (.pth / .safetensors)."""
    from medfm.models.seg.sam import PromptableSegmenter, load_sam_checkpoint

    p = Path(path)
    if p.is_file():
        from medfm.models.formats.sam2 import detect as is_sam2

        if is_sam2(p):  # a SAM 2 / MedSAM2 file used directly (nothing written)
            from medfm.models.formats.sam2 import read_sam2_file

            return read_sam2_file(p)[0]
        return load_sam_checkpoint(p)[0]
    conf = run_config(p, "promptable")
    if conf["model"].get("arch") == "sam2":  # an imported SAM 2 / MedSAM2 (single-image path)
        from medfm.models.seg.sam2 import Sam2Promptable

        return _load_weights(Sam2Promptable(conf["model"]), p)
    kw = {k: v for k, v in conf["model"].items() if k != "encoder"}
    for k in ("pixel_mean", "pixel_std"):
        kw[k] = tuple(kw[k]) if kw.get(k) else None
    return _load_weights(PromptableSegmenter(_encoder(conf["model"]["encoder"]), **kw), p)


def load_incontext_run(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, config) of an "incontext" run."""
    from medfm.models.seg.incontext import IncontextSegmenter

    p = Path(path)
    conf = run_config(p, "incontext")
    model = IncontextSegmenter(
        _encoder(conf["encoder"]),
        dim=conf["dim"],
        feature_size=conf["feature_size"],
        prior=conf.get("prior", "prototype"),
    )
    return _load_weights(model, p), conf


def load_incontext(path: str | Path) -> torch.nn.Module:
    """The in-context segmenter of an "incontext" run (for ``medfm.load_run``)."""
    return load_incontext_run(path)[0]
