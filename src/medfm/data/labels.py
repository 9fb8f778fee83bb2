"""Label columns of a manifest: check them, report what was found, encode them as class indices.

Labels are not taken on trust (issue 16 item 5): the values found and their counts go into the prepare
summary and the terminal; a column of numbers with a few stray strings (``0``, ``1``, ``maybe``) is a typo,
not a three-class task, so it is an error naming the rows — or, with ``drop_bad`` (``--drop-bad-labels``),
those rows are skipped and listed like bad files. A column that looks like labels but was not chosen
is named in a warning instead of being silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from medfm.errors import ConfigError, InputError

TASKS = ("binary", "multiclass", "multilabel")
# Column names that hold labels in most public manifests (compared lower-case).
LABEL_LIKE = ("label", "labels", "class", "target", "diagnosis", "outcome")
MAX_VALUES_REPORTED = 50  # a free-text column chosen by mistake must not flood the summary
# --drop-bad-labels for the manifest being loaded; a context value so it reaches load_manifest through
# the importers without every importer passing it on.
_DROP_BAD: ContextVar[bool] = ContextVar("medfm_drop_bad_labels", default=False)


@contextmanager
def drop_bad_labels(enabled: bool = True) -> Iterator[None]:
    """Within this block, manifests skip rows with stray label values instead of refusing them."""
    token = _DROP_BAD.set(enabled)
    try:
        yield
    finally:
        _DROP_BAD.reset(token)


@dataclass
class Labels:
    """The outcome of encode_labels (the frame itself comes back beside it)."""

    task: str
    classes: dict[str, list[Any]] = field(default_factory=dict)
    values: dict[str, dict[str, int]] = field(default_factory=dict)  # raw value -> count ("" unlabelled)
    bad_rows: list[dict[str, Any]] = field(default_factory=list)  # rows skipped by drop_bad


def is_empty(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip())


def _key(v: Any) -> str:
    return "" if is_empty(v) else (v.strip() if isinstance(v, str) else str(v))


def value_counts(raw: pd.Series) -> dict[str, int]:
    """Raw label value -> count, most frequent first ("" = unlabelled), at most MAX_VALUES_REPORTED."""
    counts = raw.map(_key).value_counts()
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_VALUES_REPORTED]
    return {str(k): int(n) for k, n in items}


def label_like_columns(columns: list[str], chosen: list[str]) -> list[str]:
    """Columns whose name says "labels" but that were not chosen as label columns."""
    return [c for c in columns if str(c).strip().lower() in LABEL_LIKE and c not in chosen]


def unused_label_warning(column: str) -> str:
    return (
        f"column '{column}' looks like labels but is not used as labels; "
        f"pass --labels {column} to use it (ignored otherwise)"
    )


def _stray(filled: pd.Series) -> pd.Series:
    """Non-numeric values of a column that is otherwise numbers (more numbers than strays): typos."""
    nums = pd.to_numeric(filled.map(_key), errors="coerce")
    stray = filled[nums.isna()]
    return stray if 0 < len(stray) < len(filled) - len(stray) else filled.iloc[:0]


def _rows(df: pd.DataFrame, index: pd.Index) -> list[int]:
    return [int(r) for r in (df.loc[index, "_row"] if "_row" in df else index + 2)]


def _bad_values(df: pd.DataFrame, col: str, declared: list[Any] | None) -> tuple[pd.Series, str]:
    """(bad values indexed like df, why they are bad) for one column."""
    filled = df[col][~df[col].map(is_empty)]
    if declared is not None:
        bad = filled[~filled.map(_key).isin([str(c) for c in declared])]
        return bad, f"expected one of {declared}"
    return _stray(filled), "the other values are numbers, so this looks like a typo (empty = unlabelled)"


def encode_labels(
    df: pd.DataFrame,
    cols: list[str],
    task: str | None,
    classes: dict[str, list[Any]],
    where: str,
    drop_bad: bool | None = None,
) -> tuple[pd.DataFrame, Labels]:
    """Check and encode label columns as int class indices (-1 = unlabelled); returns (df, Labels).

    `df` may carry a ``_row`` column (line in the source file) used to name rows in errors.
    drop_bad: skip rows with bad values (None: the ambient drop_bad_labels() setting).
    """
    drop = _DROP_BAD.get() if drop_bad is None else drop_bad
    df = df.copy()
    out = Labels(task="")
    for col in cols:
        out.values[col] = value_counts(df[col])
        bad, why = _bad_values(df, col, classes.get(col))
        if not len(bad):
            continue
        rows = _rows(df, bad.index)
        if not drop:
            shown = ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
            raise InputError(
                where,
                f"unknown label value {_key(bad.iloc[0])!r} in column '{col}' (rows {shown}); {why} "
                "(fix the rows, or pass --drop-bad-labels to skip them)",
            )
        for (i, v), r in zip(bad.items(), rows):
            out.bad_rows.append(
                {
                    "row": r,
                    "case_id": str(df.at[i, "case_id"]) if "case_id" in df else "",
                    "error": f"{where}: row {r}: unknown label value {_key(v)!r} in column '{col}' "
                    "(row skipped: --drop-bad-labels)",
                }
            )
        df = df.drop(index=bad.index)
    for col in cols:
        raw = df[col]
        filled = raw[~raw.map(is_empty)]
        declared = classes.get(col)
        if declared is not None:
            allowed = [str(c) for c in declared]
            lookup = {c: i for i, c in enumerate(allowed)}
            out.classes[col] = list(declared)
        else:
            nums = pd.to_numeric(filled, errors="coerce")
            if len(filled) and nums.notna().all() and (nums % 1 == 0).all() and (nums >= 0).all():
                values = sorted(int(v) for v in nums.unique())
                lookup = {str(v): v for v in values}
                lookup.update({str(float(v)): v for v in values})
                n_cls = max(values) + 1 if values else 0
                out.classes[col] = list(range(max(n_cls, 2 if task in ("binary", "multilabel") else 0)))
            else:
                names = sorted(filled.map(_key).unique())
                lookup = {c: i for i, c in enumerate(names)}
                out.classes[col] = names
        df[col] = [-1 if is_empty(v) else lookup[_key(v)] for v in raw]
    if task is None:
        if len(cols) > 1:
            task = "multilabel"
        elif cols:
            task = "binary" if len(out.classes[cols[0]]) <= 2 else "multiclass"
    if task is not None and task not in TASKS:
        raise ConfigError(f"{where}: task must be one of {', '.join(TASKS)}, not {task!r}")
    if task in ("binary", "multilabel"):
        for col in cols:
            bad_idx = df.index[~df[col].isin([-1, 0, 1])]
            if len(bad_idx):
                rows = ", ".join(map(str, _rows(df, bad_idx)[:5]))
                raise InputError(
                    where,
                    f"unknown label value in column '{col}' (rows {rows}): a {task} task needs 0/1 labels",
                )
    out.task = task or ""
    return df.reset_index(drop=True), out
