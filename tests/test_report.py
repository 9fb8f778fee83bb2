"""HTML report builder, plots, and the `medfm adapt` -> `medfm evaluate` -> report.html path."""

from __future__ import annotations

import base64
import json
import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfm.cli.app import app
from medfm.eval.html import Report
from test_adapt import make_prepared  # tests/ is on sys.path (pytest rootdir import mode)


def test_report_builder_is_self_contained_and_escapes(tmp_path):
    r = Report("Title <x>", subtitle="sub & more")
    r.add_heading("Section")
    r.add_text("first paragraph\n\nsecond <b>not bold</b>")
    r.add_kv({"n": 3, "auc": 0.91234})
    r.add_table(pd.DataFrame({"method": ["a", "b"], "auroc": [0.9, float("nan")]}), caption="cap")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    r.begin_row()
    r.add_figure(fig, caption="diag")
    r.end_row()
    out = r.save(tmp_path / "r.html")
    html = out.read_text()
    assert html.count("<p class=\"text\">") == 2
    assert "&lt;b&gt;not bold&lt;/b&gt;" in html and "Title &lt;x&gt;" in html
    assert "0.912" in html and "–" in html  # rounded, NaN shown as a dash
    png = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")


def test_adapt_cli_then_evaluate_writes_report(tmp_path):
    from medfm.models.io import save_encoder
    from medfm.models.registry import create_encoder

    data = make_prepared(tmp_path / "data", n=80, size=16)
    save_encoder(create_encoder("vit_tiny", img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2),
                 tmp_path / "run")
    out = tmp_path / "adapt"
    r = CliRunner().invoke(app, ["adapt", str(tmp_path / "run"), str(data), "-m", "linear,knn,prototype",
                                 "--fractions", "0.5,1.0", "--shots", "2", "--seeds", "1", "--k", "5",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Report:" in r.output
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 3 * 3
    assert {"method", "regime", "budget", "seed", "n_labels", "auroc", "accuracy", "ece"} <= set(res.columns)
    html = (out / "report.html").read_text()
    # CLI and AdaptConfig agree: the default threshold is chosen on val (issue 16 item 14)
    assert json.loads((out / "config.json").read_text())["adapt"]["threshold"] == "youden"
    assert "chosen on val by Youden" in html
    for section in ("Label efficiency", "ROC and calibration", "Embedding map", "Example predictions"):
        assert section in html, section
    assert html.count("data:image/png;base64,") >= 5

    r = CliRunner().invoke(app, ["evaluate", str(out), "--n-boot", "30"])
    assert r.exit_code == 0, r.output
    m = pd.read_csv(out / "metrics.csv")
    assert len(m) == len(res)
    # recomputed metrics match the ones adapt recorded
    merged = m.merge(res, on="run_id", suffixes=("", "_adapt"))
    np.testing.assert_allclose(merged["auroc"], merged["auroc_adapt"], rtol=1e-6)
    with_ci = m.dropna(subset=["auroc_lo"])
    assert len(with_ci) == 3 * 2  # largest budget of each method and regime, seed 0
    assert (with_ci["auroc_lo"] <= with_ci["auroc"] + 1e-9).all()
    assert "Bootstrap confidence intervals" in (out / "report.html").read_text()
    assert json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("bad", ["method", "threshold", "fraction", "augment", "smoothing"])
def test_adapt_cli_bad_options_are_one_line_errors(tmp_path, bad):
    data = make_prepared(tmp_path / "data", n=20, size=16)
    args = {"method": ["-m", "linear,magic"], "threshold": ["--threshold", "high"],
            "fraction": ["--fractions", "2"], "augment": ["--augment", "rot90"],
            "smoothing": ["--label-smoothing", "1.5"]}[bad]
    r = CliRunner().invoke(app, ["adapt", str(tmp_path / "missing_run"), str(data), *args,
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code != 0
    from medfm.errors import MedfmError

    assert isinstance(r.exception, MedfmError) and "\n" not in str(r.exception)


def test_adapt_cli_missing_model_is_input_error(tmp_path):
    data = make_prepared(tmp_path / "data", n=20, size=16)
    r = CliRunner().invoke(app, ["adapt", str(tmp_path / "nope"), str(data), "--out", str(tmp_path / "o")])
    from medfm.errors import InputError

    assert isinstance(r.exception, InputError) and "nope" in str(r.exception)


def _make_prepared_3d(root, n: int = 40, size: int = 8):
    """A tiny prepared 3D store (1, D, H, W) with no patient ids; label = a bright cube."""
    data = make_prepared(root, n=n, size=size)
    imgs2d = np.load(root / "images" / "shard-00000.npy")
    vols = np.repeat(imgs2d[:, :, None], size, axis=2)  # (n, 1, D, H, W)
    np.save(root / "images" / "shard-00000.npy", vols)
    df = pd.read_parquet(root / "manifest.parquet")
    df["patient_id"] = ""
    df.to_parquet(root / "manifest.parquet", index=False)
    summ = json.loads((root / "summary.json").read_text())
    summ["image_shape"] = [1, size, size, size]
    (root / "summary.json").write_text(json.dumps(summ))
    return data


def test_adapt_and_evaluate_on_3d_store_without_patient_ids(tmp_path):
    """Issue 16 items 9 and 16: 3D volumes go through adapt's report and evaluate; patients say unknown."""
    from medfm.models.io import save_encoder
    from medfm.models.registry import create_encoder

    data = _make_prepared_3d(tmp_path / "data")
    save_encoder(create_encoder("vit_tiny", spatial_dims=3, img_size=8, patch_size=4, depth=1, embed_dim=16,
                                num_heads=2), tmp_path / "run")
    out = tmp_path / "adapt"
    r = CliRunner().invoke(app, ["adapt", str(tmp_path / "run"), str(data), "-m", "linear,knn",
                                 "--fractions", "1.0", "--seeds", "1", "--first-seed", "2", "--k", "3",
                                 "--threshold", "0.5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = pd.read_csv(out / "results.csv")
    assert len(res) == 2 and (res["seed"] == 2).all() and (res["threshold"] == 0.5).all()
    assert res["n_patients"].isna().all()
    html = (out / "report.html").read_text()
    assert "Example predictions" in html
    assert "unknown (no patient ids; sampling is per image)" in html
    assert "fixed 0.5" in html
    assert "dashed grey line" not in html  # no scratch runs, so no text about a scratch line (item 17)
    r = CliRunner().invoke(app, ["evaluate", str(out), "--n-boot", "10"])
    assert r.exit_code == 0, r.output
    for run_id in res["run_id"]:  # evaluate's table prints whole run names (item 17)
        assert run_id in r.output, (run_id, r.output)
    assert len(pd.read_csv(out / "metrics.csv")) == 2


def test_thumbnail_2d_takes_mid_slice_of_volumes():
    from medfm.eval.plots import thumbnail_2d

    vol = np.zeros((1, 5, 4, 4), np.float32)
    vol[0, 2] = 7.0
    assert thumbnail_2d(vol).shape == (4, 4) and (thumbnail_2d(vol) == 7.0).all()
    assert (thumbnail_2d(vol[0]) == 7.0).all()
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_array_equal(thumbnail_2d(img), img[0])
