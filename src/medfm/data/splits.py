"""Patient-level train/val/test splits: no patient's images may sit on both sides of an evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from medfm.errors import ConfigError

SPLIT_NAMES = ("train", "val", "test")


def _groups(df: pd.DataFrame, group: str | None) -> pd.Series:
    """Group key per row; rows without a group value are their own group (keyed by position)."""
    own = pd.Series([f"\0row{i}" for i in range(len(df))], index=df.index)
    if not group or group not in df.columns:
        return own
    g = df[group].astype(object)
    empty = g.isna() | (g.astype(str).str.strip() == "")
    return g.astype(str).where(~empty, own)


def make_splits(
    df: pd.DataFrame,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    group: str | None = "patient_id",
    stratify: str | None = None,
    names: Sequence[str] = SPLIT_NAMES,
    split_col: str = "split",
) -> pd.Series:
    """Assign every row a split so that no group (patient) crosses splits.

    Rows that already have a value in ``split_col`` keep it; unassigned rows of a patient that already has
    an assigned row join that patient's split. The remaining groups are shuffled (``seed``) and handed out
    greedily, largest group first, to the split furthest below its target number of cases — per stratum
    when ``stratify`` names a column (a group's stratum is its most common value). Returns a Series
    aligned with ``df.index``.
    """
    if len(fractions) != len(names):
        raise ConfigError(f"need one fraction per split {tuple(names)}, got {tuple(fractions)}")
    fr = np.asarray(fractions, dtype=float)
    if (fr < 0).any() or fr.sum() <= 0:
        raise ConfigError(f"split fractions must be >= 0 and not all 0, got {tuple(fractions)}")
    fr = fr / fr.sum()
    if stratify is not None and stratify not in df.columns:
        raise ConfigError(f"stratify column '{stratify}' not in table")
    keys = _groups(df, group)
    existing = (
        df[split_col].astype(object) if split_col in df.columns else pd.Series([""] * len(df), index=df.index)
    )
    existing = existing.where(existing.notna(), "").astype(str).str.strip()
    out = existing.copy()

    # Patients already (partly) placed: their other rows follow them.
    placed = {k: s for k, s in zip(keys, existing) if s}
    todo = out == ""
    for idx in df.index[todo]:
        if keys[idx] in placed:
            out[idx] = placed[keys[idx]]
    todo = out == ""
    if not todo.any():
        return out

    rng = np.random.default_rng(seed)
    sub = pd.DataFrame({"key": keys[todo]})
    sub["stratum"] = df.loc[todo, stratify].astype(str) if stratify else ""
    sizes = sub.groupby("key", sort=True).size()
    stratum = sub.groupby("key", sort=True)["stratum"].agg(lambda s: s.value_counts().index[0])
    assign: dict[str, str] = {}
    for st in sorted(stratum.unique()):
        gkeys = np.array(stratum.index[stratum == st])
        gkeys = gkeys[rng.permutation(len(gkeys))]
        # Stable sort by size (descending) keeps the shuffled order among equal sizes.
        order = np.argsort(-sizes[gkeys].to_numpy(), kind="stable")
        total = float(sizes[gkeys].sum())
        counts = np.zeros(len(names))
        for k in gkeys[order]:
            deficit = fr * total - counts
            j = int(np.argmax(np.where(fr > 0, deficit, -np.inf)))
            assign[k] = names[j]
            counts[j] += sizes[k]
    out[todo] = [assign[k] for k in keys[todo]]
    return out


def leaking_groups(df: pd.DataFrame, group: str = "patient_id", split_col: str = "split") -> list[str]:
    """Group values that appear in more than one split (should be empty)."""
    if group not in df.columns or split_col not in df.columns:
        return []
    g = df[[group, split_col]].copy()
    g = g[g[group].notna() & (g[group].astype(str).str.strip() != "")]
    n = g.groupby(group)[split_col].nunique()
    return sorted(map(str, n.index[n > 1]))
