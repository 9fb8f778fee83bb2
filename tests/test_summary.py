"""summary.json: one Summary dataclass, one StoreWriter, validated reads (issue 17 point 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfm.data.store import PreparedDataset, read_summary
from medfm.data.store_writer import StoreWriter
from medfm.data.summary import FORMAT_VERSION, Summary, load_summary
from medfm.errors import InputError

# summary.json as today's main (before the Summary dataclass) wrote it for a small PNG folder.
OLD_PREPARE = {
    "format_version": 1,
    "n_cases": 3,
    "n_skipped": 1,
    "spatial_dims": 2,
    "image_shape": [1, 16, 16],
    "image_dtype": "uint8",
    "n_shards": 1,
    "shard_size": 1024,
    "has_masks": False,
    "label_columns": ["tb"],
    "task": "binary",
    "label_classes": {"tb": [0, 1]},
    "mask_label_names": {},
    "unlabelled_value": -1,
    "modality": "xray",
    "counts": {"split": {"train": 3}, "label": {"tb": {"0": 2, "1": 1}}},
    "skipped": [{"case_id": "c_1", "error": "<image>: empty file", "position": 3}],
    "patient_leaks": [],
    "identifiers": "patient/study/case IDs and source paths are salted hashes",
    "source": "src_abc",
    "case_map": "case_map_x.json",
    "settings": {"size": 16, "resize_mode": "pad"},
    "fingerprint": "f" * 24,
    "seconds": 0.5,
    "cases_per_s": 6.0,
}
# What train/synthetic.py wrote before (different keys) and a hand-written minimal test store.
OLD_SYNTHETIC = {
    "format_version": 1,
    "n_cases": 8,
    "image_shape": [1, 16, 16],
    "dtype": "uint8",
    "spatial_dims": 2,
    "label_columns": [],
    "task": None,
    "splits": {"train": 8},
    "source": "medfm.train.synthetic",
}
MINIMAL = {"format_version": 1, "n": 5, "label_columns": ["label"], "task": "binary",
           "image_shape": [1, 8, 8]}


def _write(root: Path, obj) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return root


@pytest.mark.parametrize(
    "old", [OLD_PREPARE, OLD_SYNTHETIC, MINIMAL], ids=["prepare", "synthetic", "minimal"]
)
def test_old_summaries_still_load(tmp_path, old):
    s = load_summary(_write(tmp_path, old))
    assert s.format_version == 1 and s.image_shape == old["image_shape"] and s.spatial_dims == 2
    assert s.n_cases == old.get("n_cases", old.get("n"))
    d = read_summary(tmp_path)
    for key, value in old.items():  # every key written before reads back (short names under their field)
        assert d[{"n": "n_cases", "dtype": "image_dtype"}.get(key, key)] == value, key
    assert d["label_values"] == {} and d["warnings"] == []  # fields added since: empty, not missing


def test_round_trip_keeps_unknown_keys(tmp_path):
    s = Summary.from_dict({**OLD_SYNTHETIC, "future_key": {"a": 1}})
    assert s.extra == {"splits": {"train": 8}, "future_key": {"a": 1}} and s.image_dtype == "uint8"
    written = StoreWriter(tmp_path).write_summary(s)
    again = load_summary(tmp_path)
    assert again == written and again.to_dict()["future_key"] == {"a": 1}


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"format_version": 1, "n_cases": 3', "not valid JSON"),
        ("[1, 2]", "summary must be a JSON object, not list"),
        ({"n_cases": 3}, "no format_version"),
        ({**MINIMAL, "format_version": FORMAT_VERSION + 1}, f"unknown format version {FORMAT_VERSION + 1}"),
        ({**MINIMAL, "format_version": "1"}, "unknown format version '1'"),
        ({**OLD_PREPARE, "n_cases": "three"}, "'n_cases' must be a count (integer >= 0), not \"three\""),
        ({**OLD_PREPARE, "n_cases": -1}, "field 'n_cases' must be a count"),
        ({**OLD_PREPARE, "image_shape": "1x16x16"}, "field 'image_shape' must be a list of ints"),
        ({**OLD_PREPARE, "label_columns": "tb"}, "field 'label_columns' must be a list of column names"),
        ({**OLD_PREPARE, "spatial_dims": 4}, "field 'spatial_dims' must be 2 or 3"),
        ({**OLD_PREPARE, "has_masks": "no"}, "field 'has_masks' must be true or false"),
        ({**OLD_PREPARE, "skipped": ["x"]}, "field 'skipped' must be a list of objects"),
    ],
)
def test_broken_summary_is_one_line_naming_file_and_problem(tmp_path, content, needle):
    root = _write(tmp_path / "store", content)
    with pytest.raises(InputError) as e:
        load_summary(root)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert msg.startswith(str(root / "summary.json") + ":")
    with pytest.raises(InputError, match="summary.json"):  # every reader goes through the check
        PreparedDataset(root)


def test_unknown_format_version_says_why(tmp_path):
    with pytest.raises(InputError, match="newer medfm wrote it"):
        load_summary(_write(tmp_path, {**MINIMAL, "format_version": 99}))


def test_missing_summary_is_not_a_prepared_dataset(tmp_path):
    with pytest.raises(InputError, match="not a prepared dataset"):
        load_summary(tmp_path)


def test_writer_refuses_an_invalid_summary(tmp_path):
    with pytest.raises(InputError, match="field 'n_cases'"):
        StoreWriter(tmp_path).write_summary(Summary(n_cases=-3))
    assert not (tmp_path / "summary.json").exists()


def _pngs(d: Path, n: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(d / f"img{i:03d}.png")
    return d


def test_every_writer_goes_through_the_summary(tmp_path):
    """prepare, the synthetic store and the benchmark pool write summaries that read back the same way."""
    from benchmarks.label_efficiency import merge_pool

    from medfm.data.prepare import PrepareConfig, prepare
    from medfm.train.synthetic import write_synthetic_dataset

    a = tmp_path / "a"
    prepare(_pngs(tmp_path / "src", 6), a, PrepareConfig(size=16, salt_file=str(tmp_path / "salt")),
            progress=False)
    b = write_synthetic_dataset(tmp_path / "b", n=10, size=16, shard_size=4)
    pool = merge_pool([a, b], tmp_path / "pool", splits=("train", "val", "test"))
    sa, sb, sp = (load_summary(p) for p in (a, b, pool))
    assert sa.n_cases == 6 and sb.n_cases == 10 and sp.n_cases == 16
    assert sa.image_shape == sb.image_shape == sp.image_shape == [1, 16, 16]
    assert sa.image_dtype == sb.image_dtype == sp.image_dtype == "uint8"
    assert sb.n_shards == 3 and sp.n_shards == 1 and sp.preprocessing == sa.preprocessing
    for root, n in ((a, 6), (b, 10), (pool, 16)):
        assert len(PreparedDataset(root)) == n  # each store opens through the same reader
        on_disk = json.loads((root / "summary.json").read_text())
        assert set(Summary().to_dict()) <= set(on_disk)  # one schema: every field is written
    assert "/" not in json.dumps(sp.extra)  # the pool names its sources by folder name, not path
