"""Reading weight files safely: safetensors, or torch files through the weights-only unpickler.

Every checkpoint medfm reads from disk goes through here, so no code path can unpickle arbitrary objects.
A torch file that the weights-only unpickler refuses is reported as refused; we never offer the
``weights_only=False`` escape hatch torch's own message suggests, because that would run the file's code.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medfm.errors import InputError

REFUSED = "refused: not a weights-only checkpoint; loading it could execute code"
# Training checkpoints wrap the weights: {"state_dict": ...}, {"model": ...}, {"teacher": ...}.
WRAPPER_KEYS = ("state_dict", "model", "teacher", "module")


def _first_sentence(e: BaseException) -> str:
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return text.splitlines()[0].split(". ")[0][:200]


def read_torch_weights(path: str | Path) -> Any:
    """The object in a .pth/.pt/.bin file, loaded with ``weights_only=True``; InputError if refused."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such checkpoint file")
    try:
        # torch warns about pickle protocols before refusing; our one-line error says all that matters.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Raised for unsafe globals (classes, functions such as os.system) and for non-pickle bytes alike.
        raise InputError(p, REFUSED) from None
    except Exception as e:  # truncated zip, foreign format...: torch raises RuntimeError and friends
        raise InputError(p, f"not a readable weights-only torch checkpoint ({_first_sentence(e)})") from None


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; InputError if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such checkpoint file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(p)), meta
    except Exception as e:  # safetensors raises several types for a truncated / foreign file
        why = f"{type(e).__name__}: {_first_sentence(e)}"
        raise InputError(p, f"not a readable safetensors checkpoint ({why})") from None


def state_dict_from(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict inside a loaded torch object (unwrapping training checkpoints)."""
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(path, "does not contain a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a .safetensors file or a weights-only .pth/.pt/.bin file."""
    p = Path(path)
    if p.suffix == ".safetensors":
        return read_safetensors(p)[0]
    return state_dict_from(read_torch_weights(p), p)
