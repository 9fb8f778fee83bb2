"""A tiny registry for things that come in kinds (encoders, objectives, adapters, tasks).

A new kind is one decorated function::

    ENCODERS = Registry("encoder")

    @ENCODERS.register("vit_tiny")
    def vit_tiny(**kw): ...

    ENCODERS.create("vit_tiny", in_chans=1)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; `create(name, **kw)` builds one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = fn
            doc = help or (fn.__doc__ or "").strip().splitlines()[0:1]
            self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            close = fnmatch.filter(self._items, f"*{name}*")
            hint = f" Did you mean: {', '.join(sorted(close)[:5])}?" if close else ""
            raise KeyError(f"Unknown {self.kind} '{name}'. Known: {', '.join(self.names())}.{hint}")
        return self._items[name]

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def describe(self, name: str) -> str:
        return self._help.get(name, "")

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
