"""One model card for every run kind: a common header, a per-kind section, and how to load the run.

``write_card(run_dir)`` renders ``README.md`` from the run's ``config.json`` and ``metrics.json``. Each kind's
section is a function ``section(config, metrics) -> str`` (markdown) registered in :data:`SECTIONS` by a small
module of this package (``@SECTIONS.register(kind)``); the registry imports those modules on first lookup.
"""

from __future__ import annotations

from medfm.modelcard.common import SECTIONS, render_card, write_card

__all__ = ["SECTIONS", "render_card", "write_card"]
