"""Run directories of promptable and in-context segmenters (config.json + seg_model.safetensors), and loading
an official SAM / MedSAM checkpoint file in place of a promptable run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medfm.errors import InputError
from medfm.runs import environment, write_json

WEIGHTS = "seg_model.safetensors"


def save_run(model: torch.nn.Module, task: str, conf: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {"task": task, **conf, "environment": environment()})
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / WEIGHTS))
    enc = getattr(model, "encoder", None)
    if enc is not None and enc.config.get("name") and enc.config["name"] != "sam_image_encoder":
        from medfm.models.io import save_encoder

        save_encoder(enc, out)
    return out


def _encoder(cfg: dict[str, Any]) -> torch.nn.Module:
    if cfg.get("name") == "sam_image_encoder":
        from medfm.models.seg.sam import SAMImageEncoder

        return SAMImageEncoder(**{k: v for k, v in cfg.items() if k != "name"})
    from medfm.models.registry import create_encoder

    return create_encoder(**cfg)


def _load_weights(model: torch.nn.Module, run: Path) -> None:
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
    model.eval()


def _config(run: Path, task: str) -> dict[str, Any]:
    p = run / "config.json"
    if not p.is_file() or not (run / WEIGHTS).is_file():
        raise InputError(run, f"not a {task} run directory (needs config.json and {WEIGHTS})")
    conf = json.loads(p.read_text())
    if conf.get("task") != task:
        raise InputError(p, f"run is a '{conf.get('task')}' run, not a '{task}' run")
    return conf


def load_promptable(path: str | Path) -> torch.nn.Module:
    """A promptable run directory, or an official SAM / MedSAM checkpoint file (.pth / .safetensors)."""
    from medfm.models.seg.sam import PromptableSegmenter, load_sam_checkpoint

    p = Path(path)
    if p.is_file():
        return load_sam_checkpoint(p)[0]
    conf = _config(p, "segment_prompt")
    kw = {k: v for k, v in conf["model"].items() if k != "encoder"}
    for k in ("pixel_mean", "pixel_std"):
        kw[k] = tuple(kw[k]) if kw.get(k) else None
    model = PromptableSegmenter(_encoder(conf["model"]["encoder"]), **kw)
    _load_weights(model, p)
    return model


def load_incontext(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    from medfm.models.seg.incontext import IncontextSegmenter

    p = Path(path)
    conf = _config(p, "segment_incontext")
    model = IncontextSegmenter(
        _encoder(conf["encoder"]),
        dim=conf["dim"],
        feature_size=conf["feature_size"],
        prior=conf.get("prior", "prototype"),
    )
    _load_weights(model, p)
    return model, conf
