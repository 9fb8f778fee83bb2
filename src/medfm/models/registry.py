"""The encoder registry: ``create_encoder("vit_tiny", spatial_dims=3)``, ``list_encoders("vit*")``.

Each family module registers its sizes with :func:`register_size` (imported on the first lookup, see
:class:`medfm.registry.Registry`); every factory goes through
:func:`build`, which rejects unknown options and records the full resolved config on ``encoder.config`` so the
encoder can be rebuilt from JSON alone (``create_encoder(**encoder.config)``).
"""

from __future__ import annotations

import inspect
from typing import Any

from medfm.errors import ConfigError
from medfm.models.base import Encoder
from medfm.registry import Registry

# The family modules register their sizes; the registry imports them on the first lookup.
ENCODERS: Registry[Encoder] = Registry(
    "encoder",
    providers=tuple(f"medfm.models.{m}"
                    for m in ("vit", "resnet", "convnext", "hybrid", "hf_vision", "densenet")))


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def build(cls: type[Encoder], name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> Encoder:
    """Instantiate ``cls`` with ``defaults`` overlaid by ``overrides``; record the resolved config."""
    params = inspect.signature(cls.__init__).parameters
    known = [p for p in params if p != "self"]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(
            f"encoder '{name}' has no option(s) {', '.join(unknown)}; options: {', '.join(known)}"
        )
    kwargs = {**defaults, **overrides}
    enc = cls(**kwargs)
    resolved = {p: kwargs.get(p, params[p].default) for p in known}
    enc.config = {"name": name, **{k: _jsonable(v) for k, v in resolved.items()}}
    return enc


def register_size(cls: type[Encoder], name: str, defaults: dict[str, Any], help_text: str) -> None:
    """Register ``name`` as ``cls`` with ``defaults`` (one named size of an encoder family)."""

    def factory(**kw: Any) -> Encoder:
        return build(cls, name, defaults, kw)

    factory.__name__ = name
    factory.options = frozenset(p for p in inspect.signature(cls.__init__).parameters if p != "self")  # type: ignore[attr-defined]
    ENCODERS.register(name, help=help_text)(factory)


def encoder_options(name: str) -> frozenset[str]:
    """The keyword options encoder ``name`` accepts (empty if it does not say)."""
    _require(name)
    return getattr(ENCODERS.get(name), "options", frozenset())


def _require(name: str) -> None:
    """ConfigError (with the known names) unless ``name`` is a registered encoder."""
    if name not in ENCODERS:
        try:
            ENCODERS.get(name)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None


def create_encoder(name: str, **kwargs: Any) -> Encoder:
    """Build a registered encoder; any keyword overrides that encoder's defaults (e.g. depth=2 for tests)."""
    _require(name)
    return ENCODERS.create(name, **kwargs)


def list_encoders(pattern: str = "*") -> list[str]:
    """Registered encoder names matching a shell-style pattern."""
    return ENCODERS.names(pattern)


def describe_encoder(name: str) -> str:
    return ENCODERS.describe(name)

