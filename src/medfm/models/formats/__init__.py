"""Importers for the public checkpoint formats: ``medfm models import SRC OUT [--format NAME]``.

Each format lives in its own module and registers one :class:`ImportFormat` with :func:`register_format`:
a cheap ``detect(src)`` (file names, a config's ``model_type``, key names — never the whole weights) and a
``convert(src, out, **options)`` that writes a normal medfm run directory (safetensors + config.json + model
card naming the source) and returns its path. ``import_model`` picks the format (``auto``: the first whose
``detect`` says yes, in registration order) and turns library errors into one-line ``InputError``s.

Rules every converter keeps: safetensors or ``torch.load(weights_only=True)`` only (through
``medfm.models.checkpoint``); a file that needs unpickling objects is refused with the reason and, where one
exists, a recipe to convert it in the source library; every key of the source is placed or the import fails
naming the keys it could not place; a parity test against the source library itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfm.errors import ConfigError, InputError, MedfmError
from medfm.registry import Registry


@dataclass(frozen=True)
class ImportFormat:
    """One external checkpoint format: how to recognise it and how to convert it to a run directory."""

    name: str
    detect: Callable[[Path], bool]
    convert: Callable[..., Path]
    help: str
    kind: str  # the kind of run it writes: encoder, clip, classifier, promptable, segmenter


# Detection order is the order below: specific layouts (open_clip, SAM 2, torchxrayvision, MONAI bundle)
# before the generic ones (a Hugging Face folder, a bare timm / ResNet state dict).
_MODULES = {
    "open_clip": "open_clip",
    "sam2": "sam2",
    "sam": "sam",
    "xrv": "xrv",
    "monai_bundle": "monai_bundle",
    "hf": "hf",
    "radimagenet": "radimagenet",
    "timm": "timm",
}
FORMATS: Registry[ImportFormat] = Registry("import format")
for _name, _mod in _MODULES.items():
    FORMATS.declare(_name, f"medfm.models.formats.{_mod}")


def register_format(
    name: str, detect: Callable[[Path], bool], help: str, kind: str
) -> Callable[[Callable[..., Path]], Callable[..., Path]]:
    """Decorator for a converter ``convert(src, out, **options) -> run dir`` of format ``name``."""

    def deco(convert: Callable[..., Path]) -> Callable[..., Path]:
        fmt = ImportFormat(name, detect, convert, help, kind)
        FORMATS.register(name, help=help)(lambda: fmt)
        return convert

    return deco


def get_format(name: str) -> ImportFormat:
    """The registered format ``name``; ConfigError listing the known ones otherwise."""
    try:
        return FORMATS.create(name)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None


def format_names() -> list[str]:
    """Every known format, in detection order."""
    return list(_MODULES)


def detect_format(src: str | Path) -> str:
    """The first format whose detector recognises ``src``; InputError naming what was tried otherwise."""
    p = Path(src)
    if not p.exists():
        raise InputError(p, "no such file or directory")
    for name in format_names():
        try:
            if get_format(name).detect(p):
                return name
        except MedfmError:
            continue  # a detector that cannot read the file is a "no"
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{_MODULES[name]}":
                raise
            continue  # a format module left out of this installation
    if p.is_file():  # say what is wrong with the file itself (refused pickle, truncated, not weights)
        from medfm.models.checkpoint import read_weights

        read_weights(p)
    raise InputError(
        p,
        f"unrecognised checkpoint format (tried {', '.join(format_names())}); "
        "name it with --format, see `medfm models formats`",
    )


def import_model(src: str | Path, out: str | Path, format: str = "auto", **options: Any) -> tuple[Path, str]:
    """Convert ``src`` into the run directory ``out``; returns (run dir, format used)."""
    p = Path(src)
    if not p.exists():
        raise InputError(p, "no such file or directory")
    name = detect_format(p) if format == "auto" else format
    fmt = get_format(name)
    opts = {k: v for k, v in options.items() if v is not None}
    try:
        return Path(fmt.convert(p, Path(out), **opts)), name
    except MedfmError:
        raise
    except TypeError as e:  # an option this format does not take
        raise ConfigError(f"format '{name}': {e}") from None
    except (KeyError, ValueError, RuntimeError, IndexError, OSError) as e:
        raise InputError(p, f"cannot import as {name} ({type(e).__name__}: {str(e)[:160]})") from None


def source_record(src: Path, format: str, **extra: Any) -> dict[str, Any]:
    """What a run's config.json says about where its weights came from (the file name, not the full path:
    a path can carry a user's or patient's folder names)."""
    return {"format": format, "file": src.name, **extra}
