"""Labels are not taken on trust (issue 16 item 5): values reported, stray strings refused or dropped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cli_entry import run_main as _cli  # tests/ is on sys.path
from medfm.data.labels import drop_bad_labels
from medfm.data.manifest import load_manifest
from medfm.data.prepare import PrepareConfig, prepare
from medfm.errors import InputError

TYPO = ["0", "1", "1", "maybe", "0", "1", "", "0"]  # row 5 of the file (header = line 1) is the typo


def _manifest(tmp_path: Path, labels: list[str], column: str = "tb", extra: dict | None = None) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i, lab in enumerate(labels):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        rows.append({"image": f"im{i}.png", column: lab, **(extra or {})})
    p = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(p, index=False)
    return p


def test_stray_string_in_a_binary_column_is_an_error_naming_the_rows(tmp_path):
    p = _manifest(tmp_path, TYPO)
    with pytest.raises(InputError) as e:
        load_manifest(p, label_cols=["tb"])
    msg = str(e.value)
    assert msg.startswith(str(p) + ":") and "\n" not in msg
    assert "'maybe'" in msg and "column 'tb'" in msg and "(rows 5)" in msg and "--drop-bad-labels" in msg


def test_many_stray_rows_are_listed_first_few(tmp_path):
    p = _manifest(tmp_path, ["0", "1"] * 8 + ["?"] * 7)
    with pytest.raises(InputError, match=r"rows 18, 19, 20, 21, 22 and 2 more"):
        load_manifest(p, label_cols=["tb"])


def test_drop_bad_labels_skips_and_lists_the_rows(tmp_path):
    p = _manifest(tmp_path, TYPO)
    for m in (load_manifest(p, label_cols=["tb"], drop_bad_labels=True), _ambient(p)):
        assert len(m.df) == 7 and m.task == "binary" and sorted(set(m.df["tb"])) == [-1, 0, 1]
        assert [b["row"] for b in m.bad_rows] == [5]
        assert "unknown label value 'maybe' in column 'tb'" in m.bad_rows[0]["error"]
        assert m.label_values["tb"] == {"0": 3, "1": 3, "": 1, "maybe": 1}


def _ambient(p: Path):
    with drop_bad_labels():  # how prepare reaches manifests loaded by the importers
        return load_manifest(p, label_cols=["tb"])


@pytest.mark.parametrize(
    "labels,task,classes",
    [
        (["benign", "malignant", "benign"], "binary", ["benign", "malignant"]),  # names: not strays
        (["0", "1", "2", "1"], "multiclass", [0, 1, 2]),
        (["a", "b", "3", "c"], "multiclass", ["3", "a", "b", "c"]),  # mostly names: "3" is a class name
    ],
)
def test_clean_columns_are_not_flagged(tmp_path, labels, task, classes):
    m = load_manifest(_manifest(tmp_path, labels), label_cols=["tb"])
    assert m.task == task and m.label_classes["tb"] == classes and not m.bad_rows


def test_declared_classes_unknown_value_can_be_dropped(tmp_path):
    p = _manifest(tmp_path, ["dog", "cow", "cat", "dog"], column="y")
    info = {"label_columns": ["y"], "label_classes": {"y": ["dog", "cow"]}}
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match=r"unknown label value 'cat' in column 'y' \(rows 4\)"):
        load_manifest(p)
    m = load_manifest(p, drop_bad_labels=True)
    assert list(m.df["y"]) == [0, 1, 0] and [b["row"] for b in m.bad_rows] == [4]


def test_label_column_without_labels_option_is_reported(tmp_path):
    m = load_manifest(_manifest(tmp_path, ["0", "1"], column="label"))
    assert m.label_columns == []
    assert m.warnings == [
        "column 'label' looks like labels but is not used as labels; pass --labels label to use it "
        "(ignored otherwise)"
    ]
    assert load_manifest(tmp_path / "manifest.csv", label_cols=["label"]).warnings == []


def test_prepare_reports_label_values_and_dropped_rows(tmp_path):
    p = _manifest(tmp_path, TYPO)
    cfg = PrepareConfig(size=16, labels=["tb"], salt_file=str(tmp_path / "salt"), drop_bad_labels=True)
    s = prepare(p, tmp_path / "out", cfg, progress=False)
    assert s["n_cases"] == 7 and s["n_skipped"] == 1
    assert "row 5: unknown label value 'maybe'" in s["skipped"][0]["error"]
    assert s["label_values"] == {"tb": {"0": 3, "1": 3, "": 1, "maybe": 1}}
    assert s["counts"]["label"]["tb"] == {"-1": 1, "0": 3, "1": 3}
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["label_values"] == s["label_values"] and on_disk["skipped"] == s["skipped"]
    with pytest.raises(InputError, match="'maybe'"):
        prepare(p, tmp_path / "out2", PrepareConfig(size=16, labels=["tb"], salt_file=cfg.salt_file))
    assert not (tmp_path / "out2").exists()  # refused before anything is written


def test_cli_refuses_stray_labels_in_one_line(tmp_path, monkeypatch, capsys):
    p = _manifest(tmp_path, TYPO)
    salt = ["--salt-file", str(tmp_path / "salt")]
    code, out, err = _cli(monkeypatch, capsys, "data", "prepare", str(p), "--out", str(tmp_path / "o"),
                          "--labels", "tb", "--size", "16", *salt)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'maybe'" in err and "(rows 5)" in err and "--drop-bad-labels" in err
    code, out, err = _cli(monkeypatch, capsys, "data", "prepare", str(p), "--out", str(tmp_path / "o"),
                          "--labels", "tb", "--size", "16", "--drop-bad-labels", *salt)
    assert code == 0, err
    assert "labels 'tb' (binary): 0: 3, 1: 3, (unlabelled): 1, maybe: 1" in out
    assert "prepared 7 cases (1 skipped" in out


def test_cli_warns_about_an_unused_label_column(tmp_path, monkeypatch, capsys):
    p = _manifest(tmp_path, ["0", "1", "1"], column="label")
    code, out, err = _cli(monkeypatch, capsys, "data", "prepare", str(p), "--out", str(tmp_path / "o"),
                          "--size", "16", "--salt-file", str(tmp_path / "salt"))
    assert code == 0, err
    assert "warning: column 'label' looks like labels but is not used as labels; pass --labels label" in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["label_columns"] == [] and "column 'label'" in summary["warnings"][0]
