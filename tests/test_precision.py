"""Mixed precision, torch.compile and the data-wait share (medfm.train.precision) and their trainer wiring."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from medfm.errors import ConfigError
from medfm.train import precision as P
from medfm.train.synthetic import write_synthetic_dataset


@pytest.fixture(autouse=True)
def _fresh_warnings():
    P._WARNED.clear()
    yield
    P._WARNED.clear()


def test_precision_names_and_autocast_dtype() -> None:
    full = P.resolve_precision("32", "cpu")
    assert not full.mixed and full.grad_scaler() is None
    bf = P.resolve_precision("bf16-mixed", "cpu")
    with bf.autocast():
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16 and bf.grad_scaler() is None
    with pytest.raises(ConfigError, match="must be 32, bf16-mixed or 16-mixed"):
        P.resolve_precision("bf16", "cpu")


def test_fp16_on_cpu_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError) as e:
        P.resolve_precision("16-mixed", "cpu")
    assert "bf16-mixed" in str(e.value) and "\n" not in str(e.value)


def test_emulated_bf16_warns_once(monkeypatch) -> None:
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            P.resolve_precision("bf16-mixed", "cpu")
    hits = [w for w in rec if "emulated" in str(w.message)]
    assert len(hits) == 1


def test_step_timer_share_is_a_fraction() -> None:
    t = iter([0.0, 1.0, 1.5, 3.0, 3.2, 4.0])  # end0=0; ready 1.0, end 1.5; ready 3.0, end 3.2 ...
    timer = P.StepTimer(clock=lambda: next(t))
    timer.step_done()
    for _ in range(2):
        timer.batch_ready()
        timer.step_done()
    s = timer.summary()
    assert s["data_wait_share"] == pytest.approx((1.0 + 1.5) / 3.2, abs=1e-3)
    assert s["step_time_ms"] == pytest.approx(1600.0)


def test_compile_runs_and_keeps_state_dict_keys() -> None:
    # backend="eager": dynamo tracing without inductor's C++ build (~20 s on a small CPU box)
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    keys = list(m.state_dict())
    P.maybe_compile(m, True, backend="eager")
    m(torch.randn(3, 4)).sum().backward()
    assert list(m.state_dict()) == keys and m[0].weight.grad is not None
    assert P.uncompile(m)._compiled_call_impl is None


def test_compile_failure_warns_once_and_runs_eager() -> None:
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    m = nn.Linear(4, 2)
    P.maybe_compile(m, True, backend=broken_backend)
    x = torch.randn(3, 4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1, y2 = m(x), m(x)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(y1, nn.functional.linear(x, m.weight, m.bias))
    assert sum("torch.compile failed" in str(w.message) for w in rec) == 1


def test_channels_last_only_for_cnns() -> None:
    cnn = P.channels_last(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)))
    assert cnn[0].weight.is_contiguous(memory_format=torch.channels_last)
    cnn3 = P.channels_last(nn.Sequential(nn.Conv3d(1, 4, 3), nn.Conv3d(4, 4, 3)))
    assert cnn3[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    lin = nn.Linear(4, 4)
    assert P.channels_last(lin) is lin


# ---------------------------------------------------------------- trainers


@pytest.fixture(scope="module")
def ds2d(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("ds") / "a", n=16, size=16, images_per_patient=2)


def _pretrain_cfg(ds, out, **kw):
    from medfm.train.config import PretrainConfig

    base = dict(data=[str(ds)], out=str(out), img_size=16, patch_size=8, batch_size=4, steps=3,
                encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, decoder_dim=16,
                decoder_depth=1, decoder_heads=2, accelerator="cpu", devices="1", log_every=1, ckpt_every=10)
    return PretrainConfig(**{**base, **kw})


def test_mae_pretrain_bf16_mixed_on_cpu(ds2d, tmp_path) -> None:
    from medfm.train.trainer import run_pretrain

    run = run_pretrain(_pretrain_cfg(ds2d, tmp_path / "run", precision="bf16-mixed"), progress=False)
    met = json.loads((run / "metrics.json").read_text())
    assert met["steps"] == 3 and math.isfinite(met["final_loss"])
    assert met["precision"] == "bf16-mixed" and met["compile"] is False
    assert 0.0 <= met["data_wait_share"] <= 1.0 and met["step_time_ms"] > 0
    assert json.loads((run / "config.json").read_text())["pretrain"]["precision"] == "bf16-mixed"
    assert "bf16-mixed" in (run / "README.md").read_text()


def test_pretrain_fp16_on_cpu_fails_before_training(ds2d, tmp_path) -> None:
    from medfm.train.trainer import run_pretrain

    with pytest.raises(ConfigError, match="use bf16-mixed"):
        run_pretrain(_pretrain_cfg(ds2d, tmp_path / "run", precision="16-mixed"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_clip_bf16_mixed_with_and_without_grad_cache(tmp_path) -> None:
    from medfm.models.text import save_tiny_bert
    from medfm.tasks.vlm.data import write_toy_pairs
    from medfm.train.clip import ClipConfig, train_clip

    bert = str(save_tiny_bert(tmp_path / "bert"))
    toy = str(write_toy_pairs(tmp_path / "toy", n=16, size=16))
    for chunk in (0, 4):
        cfg = ClipConfig(data=toy, out=str(tmp_path / f"run{chunk}"), text_tower=bert, img_size=16,
                         encoder_kwargs={"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
                         lock_text=-1, batch_size=8, epochs=4, max_steps=2, augment=False, device="cpu",
                         precision="bf16-mixed", grad_cache_chunk=chunk)
        run = train_clip(cfg, progress=False)
        m = json.loads((run / "metrics.json").read_text())
        assert m["steps"] == 2 and all(math.isfinite(h["loss"]) for h in m["history"])
        assert m["precision"] == "bf16-mixed" and 0.0 <= m["data_wait_share"] <= 1.0
        assert json.loads((run / "config.json").read_text())["clip"]["precision"] == "bf16-mixed"
    with pytest.raises(ConfigError, match="use bf16-mixed"):
        train_clip(ClipConfig(data=toy, out=str(tmp_path / "r16"), text_tower=bert, device="cpu",
                              precision="16-mixed"), progress=False)


def test_adapt_finetune_and_features_in_bf16_mixed(tmp_path) -> None:
    from medfm.tasks.adapt import AdaptConfig, Budget, run_adapt
    from test_adapt import TinyViT, make_prepared

    data = make_prepared(tmp_path / "d", n=30)
    torch.manual_seed(0)
    cfg = AdaptConfig(methods=["linear", "finetune"], budgets=[Budget("fraction", 1.0)], seeds=1, steps=3,
                      batch_size=8, precision="bf16-mixed", save_model=False, save_adapters=False)
    res = run_adapt(TinyViT(), data, tmp_path / "out", cfg)
    assert res["auroc"].notna().all()
    ft = json.loads(res.set_index("method").loc["finetune", "info"])
    assert ft["steps_run"] == 3 and math.isfinite(ft["final_loss"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["adapt"]["precision"] == "bf16-mixed"
    assert list((tmp_path / "out" / "features").glob("*-bf16-mixed.npz"))
    with pytest.raises(ConfigError, match="--precision"):
        AdaptConfig(precision="fp8")


def test_segment_train_bf16_mixed(tmp_path) -> None:
    from medfm.tasks.segment.train import SegTrainConfig, train_segmentation
    from segdata import disk_dataset

    data = tmp_path / "data"
    data.mkdir()
    disk_dataset(data, n=6, size=32)
    cfg = SegTrainConfig(data=str(data), encoder="vit_tiny", encoder_kwargs={"depth": 1, "patch_size": 8},
                         img_size=32, steps=3, batch_size=2, precision="bf16-mixed", progress=False)
    run = train_segmentation(cfg, tmp_path / "run")
    met = json.loads((run / "metrics.json").read_text())
    assert met["precision"] == "bf16-mixed" and 0.0 <= met["data_wait_share"] <= 1.0
    assert json.loads((run / "config.json").read_text())["train"]["precision"] == "bf16-mixed"
    with pytest.raises(ConfigError, match="use bf16-mixed"):
        train_segmentation(SegTrainConfig(data=str(data), img_size=32, steps=1, precision="16-mixed",
                                          progress=False), tmp_path / "r16")
