"""`medfm export`: ONNX fp32 parity with PyTorch (2D classifiers, a 3D encoder), dynamic batch, int8
variants (dynamic and static QDQ) that are smaller and keep the test-split AUROC,
the self-describing folder, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medfm
from cli_entry import run_main as _cli  # tests/ is on sys.path
from medfm.errors import InputError
from medfm.export import ExportedModel, export_run, load_exported
from medfm.rundir import RunDir, open_run
from tiny_classifiers import TINY, build_world  # tests/ is on sys.path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def exported(world):
    out = {}
    for name in TINY:
        conf = export_run(world["root"] / name, world["root"] / f"x_{name}", calib_store=str(world["data"]))
        out[name] = (world["root"] / f"x_{name}", conf)
    return out


@pytest.mark.parametrize("name", sorted(TINY))
def test_fp32_matches_pytorch_at_any_batch(world, exported, name):
    from medfm.tasks.adapt.classifier import load_classifier

    folder, conf = exported[name]
    clf = load_classifier(world["root"] / name)
    m = load_exported(folder, threads=1)
    rng = np.random.default_rng(1)
    for b in (1, 5):
        x = rng.random((b, 1, 16, 16), dtype=np.float32)
        with torch.no_grad():
            want = clf(torch.from_numpy(x)).numpy()
        got = m.run(x)
        assert got.shape == (b, 2)
        assert np.abs(got - want).max() <= 1e-4
    diffs = conf["variants"]["fp32"]["max_abs_diff"]
    assert set(diffs) == {"random", "calib", "test"} and max(diffs.values()) <= 1e-4


@pytest.mark.parametrize("name", sorted(TINY))
def test_int8_variants_are_smaller_and_keep_the_test_auroc(world, exported, name):
    folder, conf = exported[name]
    v = conf["variants"]
    assert set(conf["files"]) == {"fp32", "int8", "int8_static"}
    assert v["int8"]["bytes"] < v["fp32"]["bytes"]
    assert (folder / "model.int8.onnx").stat().st_size == v["int8"]["bytes"]
    ref = v["torch"]["test_auroc"]
    assert ref is not None and ref > 0.9  # the planted squares are learnable: a real accuracy to keep
    for variant in ("fp32", "int8", "int8_static"):
        assert abs(v[variant]["test_auroc"] - ref) <= 0.1, (variant, v[variant])
        assert v[variant]["max_abs_diff"]["test"] < 1.0  # int8 logits stay close to fp32
    # the recorded AUROC is the exported model's own on the test split, recomputed here from scratch
    from sklearn.metrics import roc_auc_score

    from medfm.data.store import PreparedDataset

    ds = PreparedDataset(world["data"], "test")
    x = np.stack([ds.image_array(i) for i in range(len(ds))]).astype(np.float32) / 255.0
    logits = load_exported(folder, "int8_static").run(x)
    p = np.exp(logits[:, 1]) / np.exp(logits).sum(1)
    assert roc_auc_score(ds.labels(), p) == pytest.approx(v["int8_static"]["test_auroc"], abs=1e-9)


def test_folder_describes_itself(world, exported):
    folder, conf = exported["vit_tiny"]
    src = open_run(world["root"] / "vit_tiny").config()
    assert open_run(folder).kind == "export"
    assert conf["source_kind"] == "classifier" and conf["task"] == "binary" and conf["classes"] == ["0", "1"]
    assert conf["threshold"] == pytest.approx(src["threshold"]) and conf["input_shape"] == [1, 16, 16]
    assert conf["preprocessing"] == src["preprocessing"] and conf["calibration"]["images"] == 36
    card = (folder / "README.md").read_text()
    assert "## Variants" in card and "model.int8-static.onnx" in card
    for name in ("README.md", "config.json", "metrics.json"):  # folder names only, never paths
        assert str(world["root"]) not in (folder / name).read_text()
    m = medfm.load_run(folder)
    assert isinstance(m, ExportedModel) and m.variant == "fp32" and m.config["files"]["fp32"] == "model.onnx"


@pytest.mark.parametrize("name,dims", [("vit_tiny", 3), ("convnext_lk_tiny", 2), ("hybrid_tiny", 3)])
def test_encoder_exports_embeddings(tmp_path, name, dims):
    """2D and 3D; ConvNeXt / hybrid need the exporter's negative Transpose axes fixed."""
    from medfm.models.io import save_encoder
    from medfm.models.registry import create_encoder
    from test_encoders import SIZE
    from test_encoders import TINY as TINY_ENCODERS

    torch.manual_seed(0)
    size = SIZE[dims]
    enc = create_encoder(name, spatial_dims=dims, img_size=size, **TINY_ENCODERS[name]).eval()
    save_encoder(enc, tmp_path / "enc")
    RunDir(tmp_path / "enc", "encoder").write_config({"encoder": enc.config})
    conf = export_run(tmp_path / "enc", tmp_path / "x", int8=False)
    assert conf["source_kind"] == "encoder" and conf["files"] == {"fp32": "model.onnx"}
    assert conf["input_shape"] == [1] + [size] * dims and conf["output"] == "embedding"
    assert conf["input"]["layout"] == ("NCDHW" if dims == 3 else "NCHW")
    m = load_exported(tmp_path / "x")
    for b in (1, 5):
        x = np.random.default_rng(b).random((b, 1, *[size] * dims), dtype=np.float32)
        with torch.no_grad():
            want = enc(torch.from_numpy(x)).numpy()
        assert np.abs(m.run(x) - want).max() <= 1e-4
    with pytest.raises(InputError, match="expects input"):
        m.run(np.zeros((1, 1, *[8] * dims), np.float32))
    with pytest.raises(InputError, match="no 'int8' variant"):
        load_exported(tmp_path / "x", "int8")


def test_cli_round_trip(world, tmp_path, monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, "export", str(world["root"] / "resnet18"), "--to",
                          str(tmp_path / "x"), "--no-int8")
    assert code == 0, err
    assert "model.onnx" in out and "max |diff| vs torch" in out and "int8" not in out
    assert load_exported(tmp_path / "x").run(np.zeros((2, 1, 16, 16), np.float32)).shape == (2, 2)


def test_cli_bad_inputs_are_one_line(tmp_path, monkeypatch, capsys):
    code, _, err = _cli(monkeypatch, capsys, "export", str(tmp_path / "nope"), "--to", str(tmp_path / "x"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "run directory not found" in err
    RunDir(tmp_path / "seg", "promptable").write_config({})
    code, _, err = _cli(monkeypatch, capsys, "export", str(tmp_path / "seg"), "--to", str(tmp_path / "x"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot export a 'promptable' run yet; exportable kinds: classifier, encoder, segmenter" in err
    assert not (tmp_path / "x").exists()
