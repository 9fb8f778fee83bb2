"""The one plugin mechanism: a registry per kind of thing (encoders, objectives, adaptation methods, card
sections), filled by the modules that provide them, imported on first lookup.

A new kind is one decorated function in a provider module::

    ENCODERS = Registry("encoder", providers=("medfm.models.vit", ...))

    @ENCODERS.register("vit_tiny")            # in medfm/models/vit.py
    def vit_tiny(**kw): ...

    ENCODERS.create("vit_tiny", in_chans=1)   # imports the providers first, once

The registry itself imports nothing, so provider modules import it freely (no cycles, no bottom-of-file
imports). A name can be *declared* with its module and help text (``declare``): it is listed without
importing anything, and looking it up imports only that module (objectives: listing them must not import
Lightning). Third-party packages add providers through the entry-point group ``medfm.plugins``: each entry
point names a module that registers into any registry, e.g. in ``pyproject.toml``::

    [project.entry-points."medfm.plugins"]
    my_encoders = "my_package.medfm_encoders"
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
ENTRY_POINT_GROUP = "medfm.plugins"
_plugins_loaded = False


def load_plugins() -> None:
    """Import every module named by a ``medfm.plugins`` entry point (once per process)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(ep.value.split(":")[0])


class Registry(Generic[T]):
    """Maps names to factories; `create(name, **kw)` builds one. ``providers``: modules that register into
    this registry, imported on the first lookup."""

    def __init__(self, kind: str, providers: Iterable[str] = ()) -> None:
        self.kind = kind
        self.providers = tuple(providers)
        self._items: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}
        self._declared: dict[str, str] = {}  # name -> module that registers it
        self._loaded = False

    # -- filling
    def register(self, name: str, help: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = fn
            first = (fn.__doc__ or "").strip().splitlines()[:1]  # no docstring: keep a declared help
            self._help[name] = help or (first[0] if first else self._help.get(name, ""))
            return fn

        return deco

    def declare(self, name: str, module: str, help: str = "") -> None:
        """Announce that ``module`` registers ``name``: listed (with ``help``) without importing it."""
        self._declared[name] = module
        self._help.setdefault(name, help)

    def _load(self) -> None:
        """Import the providers and plugins (once). Flagged first: a provider may look things up while it
        is being imported."""
        if self._loaded:
            return
        self._loaded = True
        try:
            for module in self.providers:
                importlib.import_module(module)
            load_plugins()
        except BaseException:
            self._loaded = False  # a broken provider fails every lookup loudly, not just the first
            raise

    # -- lookup
    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items and name in self._declared:
            importlib.import_module(self._declared[name])
        if name not in self._items:
            self._load()
        if name not in self._items:
            known = self.names()
            close = fnmatch.filter(known, f"*{name}*")
            hint = f" Did you mean: {', '.join(sorted(close)[:5])}?" if close else ""
            raise KeyError(f"Unknown {self.kind} '{name}'. Known: {', '.join(known)}.{hint}")
        return self._items[name]

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        self._load()
        return sorted(n for n in {*self._items, *self._declared} if fnmatch.fnmatch(n, pattern))

    def describe(self, name: str) -> str:
        if name not in self._help:
            self._load()
        return self._help.get(name, "")

    def __contains__(self, name: object) -> bool:
        if name not in self._items and name not in self._declared:
            self._load()
        return name in self._items or name in self._declared

    def __len__(self) -> int:
        return len(self.names())
