"""Manifests (loading, validation) and patient-level splits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medfm.data.manifest import load_manifest
from medfm.data.splits import leaking_groups, make_splits
from medfm.errors import ConfigError, InputError


def _write(tmp_path, rows, name="manifest.csv", dataset=None):
    pd.DataFrame(rows).to_csv(tmp_path / name, index=False)
    if dataset is not None:
        (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    return tmp_path / name


def test_load_manifest_normalises_columns_and_labels(tmp_path):
    (tmp_path / "img").mkdir()
    for n in ("a", "b", "c"):
        (tmp_path / "img" / f"{n}.png").write_bytes(b"x")
    p = _write(
        tmp_path,
        [
            {
                "image": "img/a.png",
                "text": "note a",
                "Gender": "female",
                "age": "61",
                "dx": "pneumonia",
                "view": "PA",
            },
            {"image": "img/b.png", "text": "", "Gender": "M", "age": "", "dx": "normal", "view": "AP"},
            {"image": "img/c.png", "text": "note c", "Gender": "", "age": "40", "dx": "", "view": "PA"},
        ],
        dataset={"label_columns": ["dx"], "modality": "x-ray"},
    )
    m = load_manifest(p)
    df = m.df
    assert list(df["case_id"]) == ["img/a", "img/b", "img/c"]
    assert df["image"][0] == str(tmp_path / "img" / "a.png")
    assert list(df["report"]) == ["note a", "", "note c"]
    assert list(df["sex"]) == ["F", "M", ""]
    assert df["age"][0] == 61 and np.isnan(df["age"][1])
    assert m.label_columns == ["dx"] and m.task == "binary" and m.modality == "xray"
    assert m.label_classes["dx"] == ["normal", "pneumonia"]
    assert list(df["dx"]) == [1, 0, -1]  # strings -> sorted class index, empty -> unlabelled
    assert m.extra_columns() == ["view"]
    assert m.missing_files() == []


def test_multi_image_cases_become_rows_of_one_study(tmp_path):
    p = _write(tmp_path, [{"image": "s1/f.png;s1/l.png", "patient_id": "P1"}, {"image": "s2/f.png"}])
    df = load_manifest(p).df
    assert list(df["case_id"]) == ["s1/f/0", "s1/f/1", "s2/f"]
    assert list(df["study_id"]) == ["s1/f", "s1/f", "s2/f"]
    assert list(df["patient_id"]) == ["P1", "P1", ""]


@pytest.mark.parametrize(
    "rows,dataset,labels,needle",
    [
        ([{"path_x": "a.png"}], None, None, "no 'image' column"),
        (
            [{"image": "a.png", "y": "2"}, {"image": "b.png", "y": "0"}],
            None,
            ["y"],
            None,
        ),  # multiclass is fine
        (
            [{"image": "a.png", "y": "cat"}],
            {"label_columns": ["y"], "label_classes": {"y": ["dog", "cow"]}},
            None,
            "unknown label value 'cat' in column 'y' (rows 2)",
        ),
        (
            [{"image": "a.png", "y": "3"}],
            {"label_columns": ["y"], "task": "binary"},
            None,
            "needs 0/1 labels",
        ),
        ([{"image": "a.png", "split": "holdout"}], None, None, "unknown split 'holdout'"),
        ([{"image": "a.png"}], None, ["nope"], "label column(s) ['nope'] not in manifest"),
    ],
)
def test_manifest_validation_errors_are_one_line(tmp_path, rows, dataset, labels, needle):
    p = _write(tmp_path, rows, dataset=dataset)
    if needle is None:
        m = load_manifest(p, label_cols=labels)
        assert m.task == "multiclass" and list(m.df["y"]) == [2, 0]
        return
    with pytest.raises(InputError) as e:
        load_manifest(p, label_cols=labels)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and str(p) in msg


def test_missing_files_are_reported_per_row(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    p = _write(
        tmp_path,
        [{"image": "a.png"}, {"image": "gone.png"}, {"image": "a.png", "mask": "m.png", "case_id": "x"}],
    )
    missing = dict(load_manifest(p).missing_files())
    assert set(missing) == {"gone", "x"}
    assert "gone.png: file not found" in missing["gone"] and "m.png" in missing["x"]


def test_unreadable_manifest_is_input_error(tmp_path):
    p = tmp_path / "m.parquet"
    p.write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot read manifest"):
        load_manifest(p)
    with pytest.raises(InputError, match="manifest not found"):
        load_manifest(tmp_path / "none.csv")


def _random_table(rng, n):
    n_pat = max(1, n // 3)
    pid = [f"P{rng.integers(n_pat)}" if rng.random() > 0.2 else "" for _ in range(n)]
    return pd.DataFrame({"patient_id": pid, "y": rng.integers(0, 3, n)})


@pytest.mark.parametrize("seed", range(25))
def test_no_patient_crosses_splits_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    df = _random_table(rng, n)
    fr = rng.dirichlet([1, 1, 1])
    strat = "y" if seed % 2 else None
    s = make_splits(df, tuple(fr), seed=seed, stratify=strat)
    assert len(s) == n and set(s) <= {"train", "val", "test"}
    df["split"] = s
    assert leaking_groups(df) == []
    # Singleton groups make the split exact to within the largest group per split.
    largest = df[df.patient_id != ""].groupby("patient_id").size().max() if (df.patient_id != "").any() else 1
    n_strata = 3 if strat else 1
    for name, f in zip(("train", "val", "test"), fr):
        assert abs((s == name).sum() - f * n) <= n_strata * (largest + 1)
    # Deterministic for a seed.
    assert (make_splits(df.drop(columns="split"), tuple(fr), seed=seed, stratify=strat) == s).all()


def test_existing_split_is_respected_and_patients_follow_it():
    df = pd.DataFrame(
        {
            "patient_id": ["A", "A", "B", "C", "", ""] + [f"Q{i}" for i in range(20)],
            "split": ["test", "", "val", "", "train", ""] + [""] * 20,
        }
    )
    s = make_splits(df, seed=3)
    assert s[0] == "test" and s[1] == "test"  # A's unassigned row follows its assigned row
    assert s[2] == "val" and s[4] == "train"
    assert (s != "").all()
    df["split"] = s
    assert leaking_groups(df) == []


def test_rows_without_patient_are_own_groups_and_fractions_hold():
    df = pd.DataFrame({"patient_id": [""] * 100})
    s = make_splits(df, (0.7, 0.1, 0.2), seed=0)
    assert s.value_counts().to_dict() == {"train": 70, "test": 20, "val": 10}
    assert (make_splits(df, (0.7, 0.1, 0.2), seed=1) != s).any()  # the seed matters
    with pytest.raises(ConfigError):
        make_splits(df, (0.5, 0.5))


def test_bad_rows_are_listed_not_fatal(tmp_path):
    """Issue 16 item 6: an empty row or a duplicate case id skips that row (first one kept)."""
    rows = [
        {"image": "a.png", "case_id": "1"},
        {"image": "", "case_id": "2"},
        {"image": "b.png", "case_id": "1"},
        {"image": "c.png", "case_id": "3"},
    ]
    p = _write(tmp_path, rows)
    m = load_manifest(p)
    assert list(m.df["case_id"]) == ["1", "3"] and m.df["image"].iloc[0].endswith("a.png")
    assert [(b["row"], b["case_id"]) for b in m.bad_rows] == [(3, ""), (4, "1")]
    assert "row 3: empty 'image'" in m.bad_rows[0]["error"] and str(p) in m.bad_rows[0]["error"]
    assert "row 4: duplicate case id (first at row 2" in m.bad_rows[1]["error"]


@pytest.mark.parametrize("values,task", [([0, 1, 1, 0], "binary"), ([0, 1, 2, 1], "multiclass")])
def test_one_label_picked_from_a_multilabel_set_is_not_multilabel(tmp_path, values, task):
    """--labels with one column of a dataset.json declared multilabel (e.g. the phantom's findings)."""
    rows = ["image,a,b"] + [f"x{i}.png,{v},{1 - i % 2}" for i, v in enumerate(values)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dataset.json").write_text(json.dumps({"label_columns": ["a", "b"], "task": "multilabel"}))
    if task == "binary":
        assert load_manifest(tmp_path / "m.csv").task == "multilabel"
    assert load_manifest(tmp_path / "m.csv", label_cols=["a"]).task == task


def test_trailing_legend_rows_are_bad_rows_not_labels(tmp_path):
    """Issue 16 item 11: a spreadsheet export ending in a legend and a total line stays a binary task."""
    for i in range(3):
        (tmp_path / f"a{i}.png").write_bytes(b"x")
    text = "image,label\na0.png,0\na1.png,1\na2.png,0\n\n# legend: 0 = normal, 1 = TB\nTotal,3\n"
    (tmp_path / "m.csv").write_text(text)
    m = load_manifest(tmp_path / "m.csv", label_cols=["label"])
    assert m.task == "binary" and m.label_classes["label"] == [0, 1]
    assert [b["row"] for b in m.bad_rows] == [6] and "comment row" in m.bad_rows[0]["error"]
    assert dict(m.missing_files()).keys() == {"Total"}  # reported as a missing file when prepared
