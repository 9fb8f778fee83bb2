"""One model card for every run kind: a common header, a per-kind section, and how to load the run.

``write_card(run_dir)`` renders ``README.md`` from the run's ``config.json`` and ``metrics.json``. Each kind's
section is a function ``section(config, metrics) -> str`` (markdown) registered in :data:`SECTIONS` by a small
module of this package; the modules are imported below, each guarded so that one missing or broken section
module only loses its own section (the card falls back to a plain summary).
"""

from __future__ import annotations

import importlib
import warnings

from medfm.modelcard.common import SECTIONS, render_card, write_card

# Section modules, one per kind (or family of kinds). Imported for their SECTIONS.register side effect.
_SECTION_MODULES = ("encoder", "classifier", "clip", "segment")
for _name in _SECTION_MODULES:
    try:
        importlib.import_module(f"medfm.modelcard.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"medfm.modelcard.{_name}":  # the module exists but something it imports does not
            warnings.warn(f"model card section '{_name}' unavailable: {_e}", stacklevel=1)

__all__ = ["SECTIONS", "render_card", "write_card"]
