"""`medfm segment train` writes a README.md model card; `segment evaluate` adds its metrics to it."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from medfm.cli.app import app
from segdata import disk_dataset


def test_segment_run_has_model_card_with_data_encoder_decoder_steps_metrics(tmp_path):
    from medfm.models.io import save_encoder
    from medfm.models.registry import create_encoder

    data = tmp_path / "data"
    data.mkdir()
    disk_dataset(data)
    pre = tmp_path / "mae_run"  # a stand-in pretrained run: encoder weights + config.json with the objective
    save_encoder(
        create_encoder("vit_tiny", img_size=32, depth=2, embed_dim=48, num_heads=2, patch_size=8), pre
    )
    (pre / "config.json").write_text(json.dumps({"objective": "mae", "steps": 7}))
    run = tmp_path / "run"
    args = ["segment", "train", str(data), "-o", str(run), "--encoder", str(pre), "--img-size", "32"]
    r = CliRunner().invoke(app, [*args, "--steps", "3", "--batch-size", "2", "--n-labels", "5"])
    assert r.exit_code == 0, r.output
    card = (run / "README.md").read_text()
    assert f"`{data.name}`" in card and "5 labelled cases" in card and "--n-labels 5" in card
    assert str(tmp_path) not in card  # folder names only: full paths may carry identifiers
    assert "`vit_tiny`" in card and "depth=2" in card and "patch_size=8" in card
    assert f"pretrained weights from `{pre.name}` (mae, 7 steps)" in card
    assert "kind: `segmenter`" in card and "medfm.load_run" in card
    assert "`unetr` decoder" in card and "3 steps, batch 2" in card
    assert "Not evaluated yet" in card
    ev = tmp_path / "eval"
    r = CliRunner().invoke(
        app, ["segment", "evaluate", str(run), str(data), "--split", "test", "-o", str(ev)]
    )
    assert r.exit_code == 0, r.output
    assert "Not evaluated yet" in (run / "README.md").read_text()  # the run itself is left as trained
    card = (ev / "README.md").read_text()
    dice = json.loads((ev / "metrics.json").read_text())["eval_test"]["class_1"]["dice"]
    assert "Not evaluated yet" not in card and "the run is unchanged" in card
    assert f"| test | class_1 | 2 | {dice:.4g} | " in card and " px | " in card


def test_baseline_run_card_says_no_encoder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    disk_dataset(data, n=6)
    run = tmp_path / "run"
    args = ["segment", "train", str(data), "-o", str(run), "--decoder", "monai_unet", "--img-size", "32"]
    r = CliRunner().invoke(app, [*args, "--steps", "2", "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    card = (run / "README.md").read_text()
    assert "MONAI UNet baseline" in card and "random initialisation" not in card
