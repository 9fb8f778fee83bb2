"""`summary.json` of a prepared dataset: one dataclass, validated when read.

Every writer (``prepare``, the synthetic store, the benchmark pool) builds a :class:`Summary` and writes it
with :class:`medfm.data.store_writer.StoreWriter`; every reader goes through :func:`load_summary` (or
``store.read_summary``, its dict form). A file that is not JSON, not an object, has a field of the wrong
type, or a format version this medfm does not know is refused with one line naming the file and the field.

Old summaries keep loading: keys this version does not know are kept in ``extra`` and written back as
they were; the short forms older writers used (``n``, ``dtype``) are read as ``n_cases`` / ``image_dtype``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from medfm.errors import InputError

FORMAT_VERSION = 1
SUMMARY_FILE = "summary.json"
# Short names older writers used -> the field they mean.
_ALIASES = {"n": "n_cases", "dtype": "image_dtype"}


@dataclass
class Summary:
    """What a prepared dataset holds and how it was made (the keys of summary.json)."""

    format_version: int = FORMAT_VERSION
    n_cases: int = 0
    n_skipped: int = 0
    spatial_dims: int | None = None
    image_shape: list[int] | None = None
    image_dtype: str | None = None
    n_shards: int | None = None
    shard_size: int | None = None
    has_masks: bool = False
    label_columns: list[str] = field(default_factory=list)
    task: str | None = None
    label_classes: dict[str, list[Any]] = field(default_factory=dict)
    # Raw label values found in the source and how often ({column: {value: count}}; "" = unlabelled).
    label_values: dict[str, dict[str, int]] = field(default_factory=dict)
    mask_label_names: dict[str, str] = field(default_factory=dict)
    unlabelled_value: int = -1
    modality: str | list[str] | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"case_id", "error", ...} per skip
    warnings: list[str] = field(default_factory=list)
    patient_leaks: list[str] = field(default_factory=list)
    identifiers: str | None = None
    source: str | None = None
    case_map: str | None = None
    settings: dict[str, Any] | None = None
    preprocessing: dict[str, Any] | None = None
    fingerprint: str | None = None
    seconds: float | None = None
    cases_per_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as written

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**d, **{k: v for k, v in self.extra.items() if k not in d}}

    @classmethod
    def from_dict(cls, d: Any, where: str | Path = SUMMARY_FILE) -> Summary:
        """Validate a parsed summary.json; ``where`` names the file in errors."""
        if not isinstance(d, dict):
            raise InputError(where, f"summary must be a JSON object, not {type(d).__name__}")
        d = dict(d)
        for short, full in _ALIASES.items():
            if short in d and full not in d:
                d[full] = d.pop(short)
        if "format_version" not in d:
            raise InputError(where, "no format_version (not a medfm prepared-dataset summary)")
        v = d["format_version"]
        if not _is_int(v) or not 1 <= v <= FORMAT_VERSION:
            raise InputError(
                where,
                f"unknown format version {v!r} (this medfm reads version 1 to {FORMAT_VERSION}; "
                "a newer medfm wrote it, or the file is damaged)",
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        for name in sorted(known & d.keys()):
            problem = _check(name, d[name])
            if problem:
                raise InputError(where, f"field '{name}' {problem}, not {_short(d[name])}")
        if d.get("spatial_dims") is None and isinstance(d.get("image_shape"), list) and d["image_shape"]:
            d["spatial_dims"] = len(d["image_shape"]) - 1  # (C, H, W) or (C, D, H, W)
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**{k: v for k, v in d.items() if k in known}, extra=extra)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# field -> (test, what the field must be); None is allowed where the default is None.
_RULES: dict[str, tuple[Any, str]] = {
    "format_version": (_is_int, "must be an integer"),
    "n_cases": (lambda v: _is_int(v) and v >= 0, "must be a count (integer >= 0)"),
    "n_skipped": (lambda v: _is_int(v) and v >= 0, "must be a count (integer >= 0)"),
    "spatial_dims": (lambda v: v in (2, 3) and _is_int(v), "must be 2 or 3"),
    "image_shape": (lambda v: isinstance(v, list) and all(_is_int(x) for x in v), "must be a list of ints"),
    "image_dtype": (lambda v: isinstance(v, str), "must be a dtype name"),
    "n_shards": (lambda v: _is_int(v) and v >= 0, "must be a count (integer >= 0)"),
    "shard_size": (lambda v: _is_int(v) and v >= 0, "must be a count (integer >= 0)"),
    "has_masks": (lambda v: isinstance(v, bool), "must be true or false"),
    "label_columns": (_str_list, "must be a list of column names"),
    "task": (lambda v: isinstance(v, str), "must be a task name"),
    "label_classes": (lambda v: isinstance(v, dict) and all(isinstance(x, list) for x in v.values()),
                      "must map columns to lists of classes"),
    "label_values": (lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
                     "must map columns to {value: count}"),
    "mask_label_names": (lambda v: isinstance(v, dict), "must be an object"),
    "unlabelled_value": (_is_int, "must be an integer"),
    "modality": (lambda v: isinstance(v, str) or _str_list(v), "must be a modality name or a list of them"),
    "counts": (lambda v: isinstance(v, dict), "must be an object"),
    "skipped": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
                "must be a list of objects"),
    "warnings": (_str_list, "must be a list of strings"),
    "patient_leaks": (_str_list, "must be a list of strings"),
    "identifiers": (lambda v: isinstance(v, str), "must be a string"),
    "source": (lambda v: isinstance(v, str), "must be a string"),
    "case_map": (lambda v: isinstance(v, str), "must be a file name"),
    "settings": (lambda v: isinstance(v, dict), "must be an object"),
    "preprocessing": (lambda v: isinstance(v, dict), "must be an object"),
    "fingerprint": (lambda v: isinstance(v, str), "must be a string"),
    "seconds": (_is_num, "must be a number"),
    "cases_per_s": (_is_num, "must be a number"),
}
_NULLABLE = {f.name for f in fields(Summary) if f.default is None}


def _check(name: str, value: Any) -> str | None:
    """None if `value` is valid for field `name`, else what it must be."""
    if value is None and name in _NULLABLE:
        return None
    test, must = _RULES[name]
    return None if test(value) else must


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def load_summary(root: str | Path) -> Summary:
    """The validated summary of the prepared dataset at `root` (one-line InputError if missing or bad)."""
    root = Path(root)
    p = root / SUMMARY_FILE
    if not p.is_file():
        raise InputError(root, "not a prepared dataset (no summary.json); run `medfm data prepare` first")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(p, f"not valid JSON ({str(e).splitlines()[0]})") from None
    return Summary.from_dict(d, p)
