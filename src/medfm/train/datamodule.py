"""Data for pretraining: pooled prepared datasets, per-objective views, and a resumable, rank-aware sampler.

Reproducibility design: the sampler yields ``(index, draw)`` pairs, where ``draw`` is the sample's global
position in the run's stream. Each dataset item seeds its own ``torch.Generator`` from (seed, draw), so the
augmentations of step k are the same whatever the number of workers, and a resumed run continues the exact
stream by starting the sampler at ``global_step * batch_size`` — no dataloader state to save.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medfm.data.store import PreparedDataset
from medfm.errors import ConfigError, InputError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def item_generator(seed: int, draw: int, salt: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + draw * 9_176 + salt * 31 + 12_345) % (2**63))
    return g


class PooledImages(Dataset):
    """Several prepared datasets as one list of images, with patient/study keys namespaced per dataset.

    Images come back as float32 (C, *spatial) in [0, 1] (uint8 shards) or as stored (float16 shards).
    """

    def __init__(self, roots: Sequence[str | Path], split: str | None = "train") -> None:
        if not roots:
            raise ConfigError("no data given: pass one or more prepared dataset directories")
        self.parts: list[PreparedDataset] = []
        for r in roots:
            root = Path(r)
            if not root.exists():
                raise InputError(root, "data directory does not exist")
            self.parts.append(PreparedDataset(root, split))
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        heads = [self.image(int(o)) for o in self.offsets[:-1]]
        if len({(int(h.shape[0]), h.ndim) for h in heads}) > 1:
            desc = "; ".join(f"{p.root}: {tuple(h.shape)}" for p, h in zip(self.parts, heads))
            raise ConfigError(f"pooled datasets differ in channels or dimensionality ({desc})")
        first = self.image(0)
        self.channels = int(first.shape[0])
        self.spatial_dims = first.ndim - 1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, i - int(self.offsets[k])

    def image(self, i: int) -> torch.Tensor:
        k, j = self.locate(i)
        arr = self.parts[k].image_array(j)
        img = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        return img / 255.0 if arr.dtype == np.uint8 else img

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.image(i)

    def group_keys(self, by: str) -> list[str]:
        """Per-image patient ('patient') or study ('study') key; images without one get a unique key."""
        col = {"patient": "patient_id", "study": "study_id"}[by]
        keys: list[str] = []
        for k, p in enumerate(self.parts):
            vals = p.manifest[col] if col in p.manifest.columns else [None] * len(p)
            for j, v in enumerate(vals):
                ok = v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v).strip() != ""
                keys.append(f"{k}:{v}" if ok else f"{k}:#{j}")
        return keys


class SingleViewDataset(Dataset):
    """One augmented view per item (MAE). Keys are ``(index, draw)`` from :class:`StreamSampler`."""

    def __init__(self, base: PooledImages, augment: Augment, seed: int) -> None:
        self.base, self.augment, self.seed = base, augment, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        i, draw = key if isinstance(key, tuple) else (key, key)
        g = item_generator(self.seed, draw)
        return {"image": self.augment(self.base.image(i), g), "index": i}


class PairedViewsDataset(Dataset):
    """Two views per item for contrastive learning, with a group id per item for the loss.

    ``positives="augment"``: both views are augmentations of the same image (SimCLR).
    ``"patient"`` / ``"study"``: the second view is a DIFFERENT image of the same patient/study when one
    exists (falling back to a second augmentation of the same image); ``group`` identifies the patient/study
    so the loss also treats other same-patient items in the batch as positives.
    """

    def __init__(self, base: PooledImages, augment: Augment, seed: int, positives: str = "augment") -> None:
        self.base, self.augment, self.seed, self.positives = base, augment, seed, positives
        if positives == "augment":
            self.groups = np.arange(len(base))
            self.members: dict[int, np.ndarray] = {}
        else:
            keys = base.group_keys(positives)
            uniq: dict[str, int] = {}
            self.groups = np.array([uniq.setdefault(k, len(uniq)) for k in keys], dtype=np.int64)
            order = np.argsort(self.groups, kind="stable")
            bounds = np.flatnonzero(np.diff(self.groups[order])) + 1
            self.members = {int(self.groups[c[0]]): c for c in np.split(order, bounds) if len(c) > 1}

    def __len__(self) -> int:
        return len(self.base)

    @property
    def multi_image_fraction(self) -> float:
        """Share of images that have at least one other image in their group (0 for 'augment')."""
        return float(sum(len(m) for m in self.members.values())) / max(1, len(self.base))

    def partner(self, i: int, g: torch.Generator) -> int:
        cand = self.members.get(int(self.groups[i]))
        if cand is None:
            return i
        others = cand[cand != i]
        return int(others[int(torch.randint(len(others), (), generator=g))])

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        i, draw = key if isinstance(key, tuple) else (key, key)
        g = item_generator(self.seed, draw)
        j = self.partner(i, g)
        return {
            "view1": self.augment(self.base.image(i), g),
            "view2": self.augment(self.base.image(j), g),
            "group": int(self.groups[i]),
            "index": i,
        }


class StreamSampler(Sampler):
    """An endless shuffled stream of ``(index, draw)`` keys, split across ranks, startable at any position.

    Epoch e uses permutation ``randperm(n, seed + e)``; the global stream position p maps to
    ``perm[p // n][p % n]``. Rank r of w takes positions ``k * w + r``. ``start`` (per-rank items already
    consumed) is set on resume. ``len`` is the number of items one rank draws in the whole run.
    """

    def __init__(self, n: int, total_per_rank: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if n < 1:
            raise ConfigError("the dataset is empty")
        self.n, self.total, self.seed, self.rank, self.world = n, total_per_rank, seed, rank, world
        self.start = 0

    def __len__(self) -> int:
        return self.total

    def _perm(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
        return torch.randperm(self.n, generator=g).numpy()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, perm = -1, None
        for k in range(self.start, self.total):
            p = k * self.world + self.rank
            e = p // self.n
            if e != epoch:
                epoch, perm = e, self._perm(e)
            yield int(perm[p % self.n]), p


def make_loader(
    dataset: Dataset, sampler: StreamSampler, batch_size: int, workers: int, pin_memory: bool = False
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
