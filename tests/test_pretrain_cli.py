"""`medfm pretrain mae|contrastive`: end-to-end tiny runs through the CLI and the run directory they write."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import medfm
from medfm.cli.app import app
from medfm.errors import ConfigError, InputError
from medfm.train.synthetic import write_synthetic_dataset

runner = CliRunner()
TINY_VIT = ["--encoder-args", '{"depth": 1, "embed_dim": 32, "num_heads": 2}']
COMMON = ["--workers", "0", "--log-every", "2", "--ckpt-every", "3", "--batch-size", "8"]


@pytest.fixture(scope="module")
def ds2d(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("ds") / "a", n=24, size=32, images_per_patient=3)


def invoke(args: list[str]):
    return runner.invoke(app, args, catch_exceptions=True)


def test_help_explains_options() -> None:
    res = invoke(["pretrain", "--help"])
    assert res.exit_code == 0 and "mae" in res.stdout and "contrastive" in res.stdout
    res = invoke(["pretrain", "mae", "--help"])
    assert res.exit_code == 0
    for opt in ("--mask-ratio", "--positives", "--precision", "--strategy", "--ckpt-every", "--devices"):
        assert opt in res.stdout


def test_mae_run_directory(ds2d, tmp_path) -> None:
    out = tmp_path / "run"
    res = invoke(
        [
            "pretrain",
            "mae",
            str(ds2d),
            "--out",
            str(out),
            "--img-size",
            "32",
            "--patch-size",
            "8",
            "--steps",
            "6",
            "--recon-every",
            "3",
            *TINY_VIT,
            *COMMON,
        ]
    )
    assert res.exit_code == 0, res.output
    for name in (
        "config.json",
        "model.safetensors",
        "metrics.json",
        "README.md",
        "loss_curve.png",
        "reconstructions.png",
        "checkpoints/last.ckpt",
        "logs/train.csv",
        "logs/csv/metrics.csv",
    ):
        assert (out / name).is_file(), name
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents*"))
    assert (out / "reconstructions" / "step000003.png").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pretrain"]["objective"] == "mae" and cfg["encoder"]["depth"] == 1
    assert cfg["data"][0]["images"] == 24 and "torch" in cfg["environment"]
    met = json.loads((out / "metrics.json").read_text())
    assert met["steps"] == 6 and math_finite(met["final_loss"]) and met["images_per_s"] > 0
    enc = medfm.load_encoder(out)
    assert enc.config == cfg["encoder"]
    with torch.no_grad():
        assert enc(torch.rand(2, 1, 32, 32)).shape == (2, 32)
    card = (out / "README.md").read_text()
    assert "medfm.load_encoder" in card and "mae" in card and "24" in card
    # the checkpoint holds only plain data: loadable without unpickling objects
    ck = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 6
    # a different encoder on the same --out is refused instead of silently resuming
    with pytest.raises(ConfigError, match="different run"):
        raise_from(
            invoke(
                [
                    "pretrain",
                    "mae",
                    str(ds2d),
                    "--out",
                    str(out),
                    "--img-size",
                    "32",
                    "--steps",
                    "8",
                    "--encoder-args",
                    '{"depth": 2, "embed_dim": 32, "num_heads": 2}',
                    *COMMON,
                ]
            )
        )


def test_contrastive_patient_positives_cnn_pooled(ds2d, tmp_path) -> None:
    other = write_synthetic_dataset(tmp_path / "b", n=16, size=24, seed=5)
    out = tmp_path / "run"
    res = invoke(
        [
            "pretrain",
            "contrastive",
            f"{ds2d},{other}",
            "--out",
            str(out),
            "--img-size",
            "32",
            "--encoder",
            "convnext_lk_tiny",
            "--encoder-args",
            '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 32], "kernel_size": 3}',
            "--positives",
            "patient",
            "--steps",
            "4",
            "--proj-dim",
            "16",
            *COMMON,
        ]
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert [d["images"] for d in cfg["data"]] == [24, 16]
    assert cfg["pretrain"]["positives"] == "patient"
    assert (out / "views.png").is_file()
    met = json.loads((out / "metrics.json").read_text())
    assert met["steps"] == 4 and math_finite(met["final_loss"])
    enc = medfm.load_encoder(out)
    assert enc.family == "cnn" and enc(torch.rand(1, 1, 32, 32)).shape == (1, 32)


def test_mae_3d_crops(tmp_path) -> None:
    vols = write_synthetic_dataset(tmp_path / "v", n=6, size=20, spatial_dims=3)
    out = tmp_path / "run3d"
    res = invoke(
        [
            "pretrain",
            "mae",
            str(vols),
            "--out",
            str(out),
            "--spatial-dims",
            "3",
            "--img-size",
            "16",
            "--patch-size",
            "8",
            "--steps",
            "3",
            *TINY_VIT,
            "--workers",
            "0",
            "--batch-size",
            "2",
        ]
    )
    assert res.exit_code == 0, res.output
    assert (out / "reconstructions.png").is_file()
    assert medfm.load_encoder(out).spatial_dims == 3


def test_bad_inputs_give_one_line_errors(ds2d, tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        raise_from(invoke(["pretrain", "mae", str(tmp_path / "nope"), "--out", str(tmp_path / "r1")]))
    with pytest.raises(ConfigError, match="positives"):
        raise_from(invoke(["pretrain", "contrastive", str(ds2d), "--positives", "site"]))
    with pytest.raises(ConfigError, match="2D images"):
        raise_from(
            invoke(
                [
                    "pretrain",
                    "mae",
                    str(ds2d),
                    "--spatial-dims",
                    "3",
                    "--out",
                    str(tmp_path / "r2"),
                    "--workers",
                    "0",
                ]
            )
        )
    with pytest.raises(ConfigError, match="JSON"):
        raise_from(invoke(["pretrain", "mae", str(ds2d), "--encoder-args", "{depth"]))


def raise_from(res) -> None:
    if res.exception is not None:
        raise res.exception
    raise AssertionError(f"expected an error, got exit code {res.exit_code}: {res.output}")


def math_finite(x) -> bool:
    return x is not None and float("-inf") < float(x) < float("inf")
