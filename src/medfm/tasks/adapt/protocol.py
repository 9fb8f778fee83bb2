"""Label-efficiency protocol: which training labels a run may use (label fractions, k-shot) and seeds.

Sampling is done at patient level, so a patient's images are never split between "labelled" and "unused",
and it is stratified by class so small fractions keep every class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medfm.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    """One point of a label-efficiency curve: ``regime`` "fraction" (value in (0, 1]) or "shots" (k/class)."""

    regime: str
    value: float

    @property
    def label(self) -> str:
        return f"{100 * self.value:g}% of labels" if self.regime == "fraction" else f"{int(self.value)}-shot"


def parse_budgets(fractions: str | None, shots: str | None) -> list[Budget]:
    """Parse "0.01,0.1,1.0" and "1,5,10" into Budgets, with clear errors for bad values."""
    out: list[Budget] = []
    for tok in (fractions or "").split(","):
        if not tok.strip():
            continue
        try:
            f = float(tok)
        except ValueError as e:
            raise ConfigError(f"--fractions: {tok!r} is not a number") from e
        if not 0 < f <= 1:
            raise ConfigError(f"--fractions: {f} must be in (0, 1]")
        out.append(Budget("fraction", f))
    for tok in (shots or "").split(","):
        if not tok.strip():
            continue
        try:
            k = int(tok)
        except ValueError as e:
            raise ConfigError(f"--shots: {tok!r} is not an integer") from e
        if k < 1:
            raise ConfigError(f"--shots: {k} must be >= 1")
        out.append(Budget("shots", k))
    if not out:
        raise ConfigError("no label budget given: pass --fractions and/or --shots")
    return out


def patient_strata(labels: np.ndarray, patients: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique patients, their stratum (the patient's most frequent label; for multi-label the rarest
    positive label, -1 for none) and, per image, the index of its patient."""
    patients = np.asarray([str(p) for p in patients])
    uniq, inv = np.unique(patients, return_inverse=True)
    labels = np.asarray(labels)
    if labels.ndim == 2:
        freq = labels.sum(0)
        rarest_first = np.argsort(freq, kind="stable")
        per_img = np.full(len(labels), -1)
        for j in rarest_first[::-1]:  # the rarest positive label wins (assigned last)
            per_img[labels[:, j] > 0] = j
    else:
        per_img = labels.astype(int)
    strata = np.empty(len(uniq), dtype=int)
    for i in range(len(uniq)):
        vals, counts = np.unique(per_img[inv == i], return_counts=True)
        strata[i] = vals[np.argmax(counts)]
    return uniq, strata, inv


def sample_labelled(labels: np.ndarray, patients: np.ndarray | None, budget: Budget, seed: int) -> np.ndarray:
    """Indices of the training images a run may use under ``budget`` (sorted)."""
    n = len(labels)
    if patients is None or all(str(p) in ("", "nan", "None") for p in patients):
        patients = np.array([f"img{i}" for i in range(n)])
    uniq, strata, inv = patient_strata(labels, patients)
    rng = np.random.default_rng(seed)
    if budget.regime == "fraction":
        if budget.value >= 1.0:
            return np.arange(n)
        chosen: list[int] = []
        for s in np.unique(strata):
            members = np.flatnonzero(strata == s)
            take = max(1, int(math.floor(budget.value * len(members) + 0.5)))
            chosen.extend(rng.choice(members, size=min(take, len(members)), replace=False).tolist())
        keep = np.isin(inv, chosen)
        return np.flatnonzero(keep)
    # k-shot: k distinct patients per class, one image each (so k-shot really is k labelled images).
    k = int(budget.value)
    picked: list[int] = []
    labels = np.asarray(labels)
    classes = range(labels.shape[1]) if labels.ndim == 2 else np.unique(labels)
    for c in classes:
        has_c = labels[:, c] > 0 if labels.ndim == 2 else labels == c
        pats = np.unique(inv[has_c])
        pats = rng.permutation(pats)[:k]
        for pi in pats:
            imgs = np.flatnonzero((inv == pi) & has_c)
            picked.append(int(rng.choice(imgs)))
    if labels.ndim == 2:  # multi-label: add k images with no finding so "negative" is seen too
        none = np.flatnonzero(labels.sum(1) == 0)
        if len(none):
            picked.extend(rng.choice(none, size=min(k, len(none)), replace=False).tolist())
    return np.unique(np.asarray(picked, dtype=int))
