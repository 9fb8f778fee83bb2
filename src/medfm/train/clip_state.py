"""Resumable CLIP training: the optimiser, schedule position, random streams and loss history of an unfinished
run, kept next to its weights in ``RUN/resume/`` (safetensors + JSON, no pickles).

The folder is written whole under a temporary name and then swapped in, so a kill at any moment leaves one
complete state: ``resume/``, or — if the kill fell between the two renames — ``.resume.old/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medfm.errors import InputError
from medfm.rundir import read_json, write_json

RESUME = "resume"
_OLD = ".resume.old"
_TMP = ".resume.tmp"


def resume_dir(out: str | Path) -> Path | None:
    """The complete resume state of run ``out``, or None when it has none."""
    for name in (RESUME, _OLD):
        d = Path(out) / name
        if (d / "train_state.json").is_file():
            return d
    return None


def save_state(
    out: str | Path,
    save_model: Any,
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
    progress: dict[str, Any],
) -> Path:
    """Write the model (``save_model(folder)``), optimiser, random streams and ``progress`` (step, history,
    seconds so far...) as ``out/resume``."""
    out = Path(out)
    tmp, final, old = out / _TMP, out / RESUME, out / _OLD
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp)
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items()
               for k, v in st.items() if torch.is_tensor(v)}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.generator"] = generator.get_state()
    save_file(tensors, str(tmp / "train_state.safetensors"))
    write_json(tmp / "train_state.json", {"param_groups": sd["param_groups"], **progress})
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(folder: str | Path, opt: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, Any]:
    """Restore the optimiser and random streams saved in ``folder``; returns the saved progress dict."""
    folder = Path(folder)
    try:
        meta = read_json(folder / "train_state.json")
        tensors = load_file(str(folder / "train_state.safetensors"))
    except (OSError, ValueError) as e:
        raise InputError(folder, f"unreadable resume state ({e})") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    groups = meta.pop("param_groups")
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.param_groups]:
        raise InputError(folder, "resume state does not fit this model (different trainable parameters)")
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    return meta


def drop_state(out: str | Path) -> None:
    """Remove the resume state of a run that has finished."""
    for name in (RESUME, _OLD, _TMP):
        shutil.rmtree(Path(out) / name, ignore_errors=True)
