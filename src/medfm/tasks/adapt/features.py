"""Frozen-encoder features, computed once per (encoder, dataset split) and cached as .npz in the out dir."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def encoder_fingerprint(encoder: nn.Module) -> str:
    """A hash of the encoder's config and weights: a cache key that changes whenever the model does."""
    h = hashlib.sha1(json.dumps(getattr(encoder, "config", {}), sort_keys=True, default=str).encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).to(torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def to_model_input(x: np.ndarray | torch.Tensor, encoder: nn.Module) -> torch.Tensor:
    """uint8 (value/255) or float images -> float tensor with the encoder's channels and image size.

    Resizing here lets one encoder (e.g. pretrained at 64 px) be probed on data prepared at another size
    (e.g. 28 px MedMNIST) without re-preparing the data.
    """
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    in_chans = int(getattr(encoder, "in_chans", t.shape[1]))
    if t.shape[1] != in_chans:
        if t.shape[1] == 1:
            t = t.expand(-1, in_chans, *t.shape[2:])
        elif in_chans == 1:
            t = t.mean(dim=1, keepdim=True)
    size = getattr(encoder, "img_size", None)
    if size is not None:
        size = tuple(int(s) for s in (size if isinstance(size, list | tuple) else (size,) * (t.ndim - 2)))
        if len(size) == t.ndim - 2 and tuple(t.shape[2:]) != size:
            mode = "bilinear" if t.ndim == 4 else "trilinear"
            t = F.interpolate(t, size=size, mode=mode, align_corners=False)
    return t.contiguous()


@torch.no_grad()
def extract_features(encoder: nn.Module, images: np.ndarray, batch_size: int = 64,
                     on_batch: Callable[[int], None] | None = None, precision: str = "32") -> np.ndarray:
    """Pooled embeddings (n, embed_dim) float32 of an image array (n, C, H, W), encoder in eval mode;
    computed under ``precision``'s autocast (e.g. "bf16-mixed") and cast back to float32."""
    from medfm.train.precision import resolve_precision

    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    prec = resolve_precision(precision, device)
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_input(images[i:i + batch_size], encoder).to(device)
        with prec.autocast():
            out.append(encoder(x).float().cpu().numpy())
        if on_batch:
            on_batch(len(x))
    encoder.train(was_training)
    dim = int(getattr(encoder, "embed_dim", 0))
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)


def cached_features(cache_dir: Path, fingerprint: str, split: str, encoder: nn.Module, images: np.ndarray,
                    case_ids: np.ndarray, batch_size: int = 64,
                    on_batch: Callable[[int], None] | None = None,
                    precision: str = "32") -> tuple[np.ndarray, bool]:
    """Features of one split, read from ``cache_dir`` when the same encoder, cases and precision were seen
    before (features in another precision than "32" are cached under their own name).

    Returns (features, was_cached).
    """
    tag = "" if precision == "32" else f"-{precision}"
    path = Path(cache_dir) / f"{fingerprint}-{split}{tag}.npz"
    ids = np.asarray([str(c) for c in case_ids])
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        if z["case_id"].shape == ids.shape and np.array_equal(z["case_id"], ids):
            return z["features"], True
    feats = extract_features(encoder, images, batch_size, on_batch, precision)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, features=feats, case_id=ids)
    tmp.replace(path)
    return feats, False
