"""Planted audit cohorts (medfm.data.phantom.cohorts): the defect is where the recorded truth says."""

from __future__ import annotations

import numpy as np
import pytest

from medfm.data.phantom import write_phantom
from medfm.data.phantom.cohorts import (
    MARKED,
    cohort_truth,
    draw_marker,
    flip_labels,
    plant_site_marker,
    select_cases,
)
from medfm.data.prepare import PrepareConfig, prepare
from medfm.data.store import PreparedDataset, read_manifest
from medfm.errors import InputError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    write_phantom("cxr", 96, d / "raw", seed=0, size=32)
    prepare(d / "raw", d / "store", PrepareConfig(size=32, labels=["nodule"]), progress=False)
    return d / "store"


def test_flip_labels_flips_only_the_group_in_train(store, tmp_path):
    src = read_manifest(store)
    truth = flip_labels(store, tmp_path / "flip", "sex", "F", rate=0.5, seed=1)
    m = read_manifest(tmp_path / "flip")
    assert (m["case_id"] == src["case_id"]).all()
    changed = (m["nodule"] != src["nodule"]).to_numpy()
    # Only positives of the group in train/val were turned negative; test and the other group untouched.
    assert changed.sum() == truth["n_flipped"] > 0
    assert (src.loc[changed, "nodule"] == 1).all() and (m.loc[changed, "nodule"] == 0).all()
    assert (src.loc[changed, "sex"] == "F").all()
    assert set(src.loc[changed, "split"]) <= {"train", "val"}
    assert (m["cohort_flipped"].to_numpy() == changed).all()
    for s, row in truth["per_split"].items():
        pos = ((src["split"] == s) & (src["sex"] == "F") & (src["nodule"] == 1)).sum()
        assert row["positives"] == pos and row["flipped"] == (changed & (src["split"] == s)).sum()
    # Patient-level: a patient's studies are flipped together.
    sel = ((m["sex"] == "F") & (m["split"] != "test") & (src["nodule"] == 1)).to_numpy()
    grp = m[sel].groupby("patient_id")["cohort_flipped"]
    assert (grp.nunique() == 1).all()
    assert cohort_truth(tmp_path / "flip")["rate"] == 0.5
    ds = PreparedDataset(tmp_path / "flip", "train")  # the copy is a valid store, labels read back
    assert int(ds.labels().sum()) == int(m[m["split"] == "train"]["nodule"].sum())
    assert np.array_equal(ds.image_array(0), PreparedDataset(store, "train").image_array(0))


def test_flip_rate_one_removes_every_train_positive_of_the_group(store, tmp_path):
    flip_labels(store, tmp_path / "all", "sex", "M", rate=1.0)
    m = read_manifest(tmp_path / "all")
    assert m[(m["sex"] == "M") & (m["split"] == "train")]["nodule"].sum() == 0


def test_site_marker_follows_label_in_train_not_in_test(store, tmp_path):
    truth = plant_site_marker(store, tmp_path / "mark", correlation=1.0, test_rate=0.5, seed=0)
    src_ds, ds = PreparedDataset(store), PreparedDataset(tmp_path / "mark")
    m = ds.manifest
    size = truth["marker_px"]
    assert size == 4  # 32 px // 8
    for i in range(len(ds)):
        img = ds.image_array(i)
        is_marked = m.at[i, "site"] == MARKED
        if not is_marked:
            assert np.array_equal(img, src_ds.image_array(i))
        else:  # the corner is at full brightness and nothing else changed
            assert (img[..., :size, -size:] == 255).all()
            rest = img.copy()
            rest[..., :size, -size:] = 0
            orig = src_ds.image_array(i).copy()
            orig[..., :size, -size:] = 0
            assert np.array_equal(rest, orig)
    train = m[m["split"] == "train"]
    # correlation 1: marker exactly where the (first-study) label is positive -> near-perfect in train.
    assert truth["per_split"]["train"]["phi_label_marker"] > 0.8
    assert abs(truth["per_split"]["test"]["phi_label_marker"] or 0.0) < 0.8
    assert set(train["site"]) == {MARKED, "site_plain"}
    assert "phantom_site" in m.columns and set(m["phantom_site"]) <= {"site_a", "site_b", "site_c"}
    assert cohort_truth(tmp_path / "mark")["kind"] == "site_marker"
    assert cohort_truth(store) is None


def test_select_cases_subsets_and_relabels(store, tmp_path):
    src = read_manifest(store)
    keep = (src["site"] == "site_b").to_numpy()
    select_cases(store, tmp_path / "b", keep, label="effusion")
    ds = PreparedDataset(tmp_path / "b")
    assert len(ds) == keep.sum() and set(ds.manifest["site"]) == {"site_b"}
    assert ds.label_columns == ["effusion"]
    assert np.array_equal(ds.labels(), src.loc[keep, "effusion"].astype(int).to_numpy())
    first = int(np.flatnonzero(keep)[0])
    assert np.array_equal(ds.image_array(0), PreparedDataset(store).image_array(first))
    assert np.array_equal(ds[0]["mask"].numpy(), PreparedDataset(store)[first]["mask"].numpy())
    select_cases(store, tmp_path / "u", drop_labels=True)
    assert PreparedDataset(tmp_path / "u").labels() is None


def test_draw_marker_corners():
    a = np.zeros((1, 8, 8), np.uint8)
    assert draw_marker(a, 2, "bottom_left")[0, 6:, :2].min() == 255
    assert draw_marker(a, 2, "bottom_left").sum() == 4 * 255
    assert a.sum() == 0  # input untouched


def test_bad_inputs_are_one_line_errors(store, tmp_path):
    with pytest.raises(InputError, match="no column 'nope'"):
        flip_labels(store, tmp_path / "x", "nope", "F", 0.5)
    with pytest.raises(InputError, match="rate"):
        flip_labels(store, tmp_path / "x", "sex", "F", 1.5)
    with pytest.raises(InputError, match="no case has"):
        flip_labels(store, tmp_path / "x", "sex", "Q", 0.5)
    with pytest.raises(InputError, match="new folder"):
        plant_site_marker(store, store)
