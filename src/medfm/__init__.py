"""medfm — medical imaging foundation models: pretrain, adapt, evaluate, segment, vision-language."""

from __future__ import annotations

__version__ = "0.1.0"


def load_encoder(path, **kwargs):
    """Load an encoder from a run directory, a model.safetensors file, or an external checkpoint."""
    from medfm.models.io import load_encoder as _load

    return _load(path, **kwargs)


def load_run(path):
    """Load what a run directory holds, by its kind (encoder, clip, classifier, segmenter, ...)."""
    from medfm.rundir import load_run as _load

    return _load(path)


__all__ = ["__version__", "load_encoder", "load_run"]
