"""Run directories: one writer (atomic), one loader by kind, old run dirs still load, one model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import medfm
from medfm.errors import InputError
from medfm.rundir import FORMAT_VERSION, LOADERS, RunDir, load_run, open_run

OLD_RUNS = Path(__file__).parent / "fixtures" / "old_runs"  # written by main before RunDir (make_old_runs.py)


def _old(tmp_path: Path, name: str) -> Path:
    """A copy of an old fixture run (loading must not need to write, but a test must never alter fixtures)."""
    return Path(shutil.copytree(OLD_RUNS / name, tmp_path / name))


def _tiny_encoder():
    from medfm.models.registry import create_encoder

    return create_encoder("vit_tiny", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)


@pytest.mark.parametrize(
    "name, kind",
    [("pretrain_mae", "encoder"), ("clip", "clip"), ("adapt", "adapt"), ("segment", "segmenter"),
     ("promptable", "promptable"), ("incontext", "incontext")],
)
def test_old_run_dirs_get_their_kind(tmp_path, name, kind):
    run = open_run(_old(tmp_path, name))
    assert run.kind == kind and run.config()["kind"] == kind


def test_old_encoder_run_loads_and_embeds(tmp_path):
    from medfm.models.base import Encoder

    enc = medfm.load_run(_old(tmp_path, "pretrain_mae"))
    assert isinstance(enc, Encoder)
    with torch.no_grad():
        assert enc(torch.rand(2, 1, 32, 32)).shape == (2, 32)


def test_old_clip_run_loads_and_encodes(tmp_path):
    from medfm.models.clip import ClipModel

    model = medfm.load_run(_old(tmp_path, "clip"))
    assert isinstance(model, ClipModel)
    with torch.no_grad():
        img = model.encode_images(torch.rand(2, 1, 32, 32))
        txt = model.encode_texts(["no pleural effusion"])
    assert img.shape[0] == 2 and txt.shape == (1, img.shape[1])


def test_old_adapt_run_loads_its_results(tmp_path):
    res = medfm.load_run(_old(tmp_path, "adapt"))
    assert isinstance(res, pd.DataFrame)
    assert list(res["method"].unique()) == ["linear"] and res["auroc"].between(0, 1).all()


def test_old_segmentation_runs_load_and_predict(tmp_path):
    from medfm.models.seg.incontext import IncontextSegmenter
    from medfm.models.seg.registry import SegmentationModel
    from medfm.models.seg.sam import PromptableSegmenter

    seg = medfm.load_run(_old(tmp_path, "segment"))
    assert isinstance(seg, SegmentationModel)
    with torch.no_grad():
        out = seg(torch.rand(1, 1, 32, 32))
    assert out.shape[-2:] == (32, 32)
    assert isinstance(medfm.load_run(_old(tmp_path, "promptable")), PromptableSegmenter)
    assert isinstance(medfm.load_run(_old(tmp_path, "incontext")), IncontextSegmenter)


def test_encoder_round_trip(tmp_path):
    from medfm.models.io import save_encoder

    enc = _tiny_encoder().eval()
    run = RunDir(tmp_path / "run", kind="encoder")
    run.write_config({"encoder": dict(enc.config)})
    save_encoder(enc, run.path)
    conf = json.loads((run.path / "config.json").read_text())
    assert conf["kind"] == "encoder" and conf["format_version"] == FORMAT_VERSION
    assert "torch" in conf["environment"] and "medfm" in conf["environment"]
    again = load_run(run.path)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), again(x))


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_every_kind_has_a_loader(kind):
    """Each kind's loader resolves (the 'classifier' entry once named a module that did not exist)."""
    from medfm.rundir import _resolve

    assert callable(_resolve(LOADERS[kind]))


def test_adapt_round_trip(tmp_path):
    run = RunDir(tmp_path / "a", kind="adapt")
    run.write_config({"task": "binary"})  # adapt runs keep 'task' = the label task; kind still wins
    pd.DataFrame({"method": ["knn"], "auroc": [0.75]}).to_csv(run.path / "results.csv", index=False)
    assert open_run(run.path).kind == "adapt"
    assert load_run(run.path)["auroc"].tolist() == [0.75]
    run.write_table("t.parquet", pd.DataFrame({"a": [1, 2]}))
    run.write_table("t.csv", pd.DataFrame({"a": [3]}))
    assert pd.read_parquet(run.path / "t.parquet")["a"].tolist() == [1, 2]
    assert pd.read_csv(run.path / "t.csv")["a"].tolist() == [3]
    assert not list(run.path.glob(".*tmp"))  # atomic writes leave no temporary files


def test_weights_and_metrics_round_trip(tmp_path):
    run = RunDir(tmp_path / "r", kind="encoder")
    lin = torch.nn.Linear(3, 2)
    p = run.write_weights(lin, "head.safetensors", metadata={"note": "x"})
    from safetensors import safe_open
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(p))["weight"], lin.weight.detach())
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata()["note"] == "x"
    run.write_metrics({"a": 1})
    run.write_metrics({"b": 2.5})
    assert run.metrics() == {"a": 1, "b": 2.5}
    run.write_metrics({"c": 3}, merge=False)
    assert run.metrics() == {"c": 3}


def test_crash_between_writes_keeps_the_old_file(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "r", kind="encoder")
    run.write_metrics({"steps": 1})
    w = run.write_weights({"w": torch.ones(2)})
    old_weights = w.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        run.write_metrics({"steps": 2})
    with pytest.raises(OSError, match="disk full"):
        run.write_weights({"w": torch.zeros(2)})
    monkeypatch.undo()
    assert run.metrics() == {"steps": 1}
    assert w.read_bytes() == old_weights
    assert sorted(p.name for p in run.path.iterdir()) == ["metrics.json", "model.safetensors"]  # no temp left


def test_unknown_kind_and_non_runs_are_one_line_errors(tmp_path):
    RunDir(tmp_path / "x", kind="hologram").write_config({})
    with pytest.raises(InputError) as e:
        load_run(tmp_path / "x")
    msg = str(e.value)
    assert "\n" not in msg and "hologram" in msg and all(k in msg for k in LOADERS)
    with pytest.raises(InputError, match="not found"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_run(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        open_run(tmp_path / "bad")
    with pytest.raises(ValueError, match="kind"):
        RunDir(tmp_path / "y").write_config({})


def test_card_says_patients_unknown_without_patient_ids(tmp_path):
    run = RunDir(tmp_path / "run", kind="encoder")
    data = [{"path": "/archive/site_a/prepared", "split": "train", "images": 40, "patients": None}]
    run.write_config({"data": data, "preprocessing": {"size": 32, "modality": "xray"},
                      "pretrain": {"objective": "mae"}, "encoder": {"name": "vit_tiny"}})
    card = run.write_card().read_text()
    assert "unknown (no patient ids; sampling is per image)" in card
    assert "| 40 |" in card and "size=32" in card and "medfm.load_run" in card
    assert "/archive/site_a" not in card  # only the dataset's folder name, not the user's path
    with_ids = RunDir(tmp_path / "run2", kind="encoder")
    with_ids.write_config({"data": [dict(data[0], patients=7)]})
    card = with_ids.write_card().read_text()
    assert "| 7 |" in card and "unknown" not in card


def test_card_for_every_old_run(tmp_path):
    for name in ("pretrain_mae", "clip", "adapt", "segment", "promptable", "incontext"):
        card = open_run(_old(tmp_path, name)).write_card().read_text()
        assert card.startswith("# medfm ") and "medfm.load_run" in card, name


def test_pretrain_on_images_without_patient_ids_says_unknown(tmp_path):
    """Issue 16 (items 8, 16): no patient ids must not be reported as 'patients: 1'."""
    import numpy as np
    from PIL import Image

    from medfm.data.prepare import PrepareConfig, prepare
    from medfm.train.config import PretrainConfig
    from medfm.train.trainer import run_pretrain

    src = tmp_path / "pngs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(src / f"x{i}.png")
    store = tmp_path / "prepared"
    prepare(src, store, PrepareConfig(size=32, fractions=(1.0, 0.0, 0.0)), progress=False)
    cfg = PretrainConfig(data=[str(store)], out=str(tmp_path / "run"), img_size=32, patch_size=8, steps=2,
                         batch_size=4, encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    run = open_run(run_pretrain(cfg, progress=False))
    conf = run.config()
    assert conf["kind"] == "encoder" and conf["data"][0]["patients"] is None
    assert conf["preprocessing"]["size"] == 32
    card = (run.path / "README.md").read_text()
    assert "| 10 | unknown (no patient ids; sampling is per image) |" in card
    assert isinstance(load_run(run.path), torch.nn.Module)
