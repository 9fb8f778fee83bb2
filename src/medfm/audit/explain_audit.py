"""One call for the audit: maps of every applicable method, each with its sanity checks beside it.

Usage::

    audit = audit_explanations(clf, x, masks=lung_masks)
    audit.to_dict()  # JSON-ready: per method randomisation steps, pass/fail, localisation vs chance
    audit.maps["gradcam"]  # [B, *spatial], e.g. for explain_figures.save_overlay
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from medfm.audit.explain import Target, eval_mode, find_encoder, methods_for, resolve_target, saliency
from medfm.audit.explain_sanity import (
    Localisation,
    RandomisationResult,
    cascading_randomisation,
    localisation,
)
from medfm.errors import ConfigError


@dataclass
class MethodAudit:
    method: str
    randomisation: RandomisationResult
    localisation: Localisation | None = None

    @property
    def passed(self) -> bool:
        """The randomisation test's verdict: a map that survives random weights does not explain the model."""
        return self.randomisation.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "passed_randomisation": self.passed,
            "randomisation": self.randomisation.to_dict(),
            "localisation": self.localisation.to_dict() if self.localisation else None,
        }


@dataclass
class ExplanationAudit:
    threshold: float
    methods: dict[str, MethodAudit] = field(default_factory=dict)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the maps themselves (those go to figures)."""
        return {
            "threshold": self.threshold,
            "targets": self.targets,
            "methods": {k: m.to_dict() for k, m in self.methods.items()},
        }


def audit_explanations(
    model: nn.Module,
    x: torch.Tensor,
    *,
    masks: torch.Tensor | np.ndarray | None = None,
    kinds: Sequence[str] | None = None,
    target: Target = None,
    encoder: nn.Module | None = None,
    threshold: float = 0.5,
    seed: int = 0,
    sanity_cases: int = 8,
    tolerance: int = 0,
    with_ssim: bool = False,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> ExplanationAudit:
    """Maps for ``kinds`` (default: every method that fits the encoder) on all of ``x``; the cascading
    randomisation test on the first ``sanity_cases`` cases (it recomputes maps once per layer group);
    localisation against ``masks`` when given. ``options`` passes per-method settings, e.g.
    ``{"integrated_gradients": {"n_steps": 16}}``."""
    enc = find_encoder(model, encoder)
    kinds = list(kinds) if kinds is not None else methods_for(enc)
    if not kinds:
        raise ConfigError("no saliency method selected")
    if sanity_cases < 1:
        raise ConfigError(f"sanity_cases must be >= 1, got {sanity_cases}")
    options = options or {}
    with eval_mode(model), torch.no_grad():
        t = resolve_target(model(x), target)
    audit = ExplanationAudit(threshold=float(threshold), targets=[int(v) for v in t.cpu()])
    extra = {"encoder": encoder} if encoder is not None else {}
    for kind in kinds:
        maps = saliency(kind, model, x, t, **extra, **options.get(kind, {}))
        audit.maps[kind] = maps
        n = min(sanity_cases, x.shape[0])
        rand = cascading_randomisation(
            model, x[:n], kind, t[:n], encoder=encoder, threshold=threshold, seed=seed,
            with_ssim=with_ssim, trained_maps=maps[:n], **options.get(kind, {}),
        )  # fmt: skip
        loc = localisation(maps, masks, tolerance) if masks is not None else None
        audit.methods[kind] = MethodAudit(kind, rand, loc)
    return audit
