"""Segmentation task: metrics in mm, aligned mask I/O, CLI train -> evaluate -> predict."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medfm.cli.app import app
from medfm.tasks.segment.io import overlay, write_mask_nifti
from medfm.tasks.segment.metrics import segmentation_metrics
from segdata import disk_dataset


def test_hd95_uses_spacing_and_dice_is_exact():
    ref = torch.zeros(1, 20, 20, dtype=torch.long)
    ref[0, 5:15, 5:15] = 1
    pred = torch.zeros_like(ref)
    pred[0, 5:15, 7:17] = 1  # shifted 2 px along x
    m1 = segmentation_metrics(pred, ref, 2, spacing=(1.0, 1.0))["class_1"]
    m2 = segmentation_metrics(pred, ref, 2, spacing=(1.0, 3.0))["class_1"]
    assert m1["dice"] == pytest.approx(2 * 80 / 200)
    assert m1["hd95_mm"] == pytest.approx(2.0, abs=1e-4)
    assert m2["hd95_mm"] == pytest.approx(6.0, abs=1e-4)  # same pixels, 3 mm per x step
    assert segmentation_metrics(ref, ref, 2)["class_1"]["surface_dice"] == pytest.approx(1.0)


def test_nifti_mask_keeps_input_affine(tmp_path):
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [10, -20, 5]
    labels = np.zeros((4, 6, 8), dtype=np.uint8)  # (D, H, W)
    labels[1, 2, 3] = 2
    p = write_mask_nifti(labels, tmp_path / "m.nii.gz", affine)
    img = nib.load(str(p))
    assert np.allclose(img.affine, affine) and img.shape == (8, 6, 4)
    assert np.asarray(img.dataobj)[3, 2, 1] == 2


def test_overlay_draws_contours():
    lab = np.zeros((16, 16), dtype=np.int64)
    lab[4:12, 4:12] = 1
    rgb = overlay(np.full((1, 16, 16), 0.5), lab)
    assert (
        rgb.shape == (16, 16, 3)
        and tuple(rgb[4, 4]) != (127, 127, 127)
        and tuple(rgb[8, 8]) == (127, 127, 127)
    )


def test_cli_train_evaluate_predict_2d(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    disk_dataset(data)
    run = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        [
            "segment",
            "train",
            str(data),
            "-o",
            str(run),
            "--encoder",
            "vit_tiny",
            "--encoder-depth",
            "2",
            "--img-size",
            "32",
            "--steps",
            "30",
            "--batch-size",
            "4",
            "--n-labels",
            "6",
            "--lr",
            "3e-3",
            "--encoder-lr-scale",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    conf = json.loads((run / "config.json").read_text())
    assert conf["n_train"] == 6 and conf["decoder"] == "unetr"
    assert (run / "model.safetensors").is_file()  # the encoder alone, loadable by medfm.load_encoder
    import medfm

    assert medfm.load_encoder(run).config["depth"] == 2
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    ev = tmp_path / "eval"
    args = ["segment", "evaluate", str(run), str(data), "--split", "test", "-o", str(ev)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    metrics = json.loads((ev / "metrics.json").read_text())["eval_test"]
    assert 0.0 <= metrics["class_1"]["dice"] <= 1.0 and metrics["class_1"]["n"] == 2
    # PNGs carry no pixel spacing: HD95 is in pixels, and says so
    assert metrics["class_1"]["hd95_unit"] == "px" and " px " in r.output and " mm " not in r.output
    args = ["segment", "evaluate", str(run), str(data), "--keep-components", "1", "--fill-holes"]
    args += ["-o", str(ev)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert {"eval_test", "eval_test_pp"} <= set(json.loads((ev / "metrics.json").read_text()))
    # evaluation never changes the model's run directory (issue 16, item 15)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    out = tmp_path / "pred"
    r = CliRunner().invoke(app, ["segment", "predict", str(run), str(data), "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = np.asarray(Image.open(out / "im10_mask.png"))
    assert m.shape == (32, 32) and set(np.unique(m)) <= {0, 1}
    assert (out / "im10_overlay.png").is_file()
    html = (out / "report.html").read_text()
    assert "im10" in html and "data:image/png;base64" in html


def test_cli_3d_sliding_window_writes_aligned_nifti(tmp_path):
    data = tmp_path / "vol"
    data.mkdir()
    disk_dataset(data, n=4, three_d=True)
    run = tmp_path / "run3d"
    r = CliRunner().invoke(
        app,
        [
            "segment",
            "train",
            str(data),
            "-o",
            str(run),
            "--decoder",
            "monai_unet",
            "--patch",
            "16,16,16",
            "--steps",
            "4",
            "--batch-size",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    out = tmp_path / "pred3d"
    r = CliRunner().invoke(app, ["segment", "predict", str(run), str(data), "-o", str(out)])
    assert r.exit_code == 0, r.output
    pred = nib.load(str(out / "im3_mask.nii.gz"))
    src = nib.load(str(data / "im3.nii.gz"))
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)


def test_bad_inputs_are_one_line_errors(tmp_path):
    r = CliRunner().invoke(app, ["segment", "train", str(tmp_path), "-o", str(tmp_path / "r")])
    assert r.exit_code != 0 and "manifest.csv" in str(r.exception)
    (tmp_path / "manifest.csv").write_text("image,mask\nmissing.png,missing_mask.png\n")
    r = CliRunner().invoke(app, ["segment", "train", str(tmp_path), "-o", str(tmp_path / "r")])
    assert "missing.png" in str(r.exception)
    r = CliRunner().invoke(app, ["segment", "evaluate", str(tmp_path), str(tmp_path)])
    assert "not a segmentation run directory" in str(r.exception)


def test_postprocess_keeps_largest_components_and_fills_holes():
    from medfm.tasks.segment.postprocess import clean_binary, clean_labels

    m = np.zeros((20, 20), dtype=bool)
    m[2:10, 2:8] = True  # left "lung" (48 px) with a hole
    m[5, 5] = False
    m[2:12, 12:18] = True  # right "lung" (60 px)
    m[16, 16] = True  # a 1-pixel island
    out = clean_binary(m, keep=2, fill_holes=True)
    assert out[5, 5] and not out[16, 16]
    assert int(out.sum()) == 48 + 60
    assert int(clean_binary(m, keep=1, fill_holes=False).sum()) == 60
    # label maps: each class cleaned on its own, other classes untouched when not asked for
    lab = torch.zeros(20, 20, dtype=torch.long)
    lab[torch.from_numpy(m)] = 1
    lab[0, 0] = 2
    cleaned = clean_labels(lab, keep=2, fill_holes=True, classes=[1])
    assert int(cleaned[0, 0]) == 2 and int(cleaned[16, 16]) == 0 and int(cleaned[5, 5]) == 1
    with pytest.raises(Exception, match="keep"):
        clean_binary(m, keep=0)
