"""`medfm prune` / `medfm distill`: the MACs target is met, the pruned run reloads (shapes rebuilt) and
predicts like the in-memory model, exports to ONNX; distillation gives a loadable student; one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_entry import run_main as _cli  # tests/ is on sys.path
from medfm.compress import distill, prune_classifier
from medfm.rundir import open_run
from medfm.tasks.adapt.classifier import load_classifier
from test_adapt import make_prepared  # tests/ is on sys.path (pytest rootdir import mode)
from tiny_classifiers import TINY, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("compress"))


@pytest.mark.parametrize("name", sorted(TINY))
def test_pruned_run_meets_target_reloads_and_exports(world, name):
    from medfm.export import export_run

    root = world["root"]
    s = prune_classifier(root / name, world["data"], root / f"p_{name}", target_macs_reduction=0.25,
                         finetune_steps=10, batch_size=8)
    assert s["macs_after"] <= 0.75 * s["macs_before"] and s["params_after"] < s["params_before"]
    conf = open_run(root / f"p_{name}").config()
    assert conf["kind"] == "classifier" and conf["pruned_from"] == name
    assert conf["macs_reduction"] >= 0.25 and conf["auroc_after"] is not None
    clf = load_classifier(root / f"p_{name}")
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), s["model"](x))
    if name.startswith("vit"):  # only the MLP hidden width is pruned
        assert clf.encoder.blocks[0].mlp.fc1.out_features < 4 * 32
        assert clf.encoder.blocks[0].attn.qkv.out_features == 3 * 32
    else:
        assert clf.encoder.embed_dim == clf.head.in_features
    xc = export_run(root / f"p_{name}", root / f"x_{name}", int8=False)
    assert max(xc["variants"]["fp32"]["max_abs_diff"].values()) <= 1e-4


def test_unpruned_run_loads_as_before(world):
    clf = load_classifier(world["root"] / "resnet18")
    assert clf.encoder.embed_dim == 64
    assert "pruned_shapes" not in open_run(world["root"] / "resnet18").config()


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_distill_gives_a_loadable_student(world, tmp_path, task):
    from medfm.models.registry import create_encoder
    from medfm.tasks.adapt import fit_classifier

    if task == "binary":
        data, teacher = world["data"], world["root"] / "vit_tiny"
    else:
        data = make_prepared(tmp_path / "d", n=40, task=task)
        teacher = tmp_path / "t"
        torch.manual_seed(0)
        fit_classifier(create_encoder("vit_tiny", img_size=16, **TINY["vit_tiny"]), data, teacher,
                       method="linear")
    s = distill(teacher, data, tmp_path / "s", student="resnet18", student_kwargs={"width": 4}, steps=8,
                batch_size=8)
    clf = load_classifier(tmp_path / "s")
    p = clf.predict_proba(torch.rand(3, 1, 16, 16))
    assert torch.isfinite(p).all() and p.shape[1] == len(clf.classes)
    conf = open_run(tmp_path / "s").config()
    assert conf["distilled_from"] == teacher.name and conf["encoder"]["name"] == "resnet18"
    assert "teacher_auroc" in conf and "student_auroc" in conf and conf["student_params"] > 0
    assert s["teacher_macs"] > 0


def test_soft_loss_matches_reference():
    from medfm.compress.distill import soft_loss

    s, t = torch.randn(5, 3), torch.randn(5, 3)
    ref = (torch.softmax(t / 2, 1) * (torch.log_softmax(t / 2, 1) - torch.log_softmax(s / 2, 1))).sum(1)
    torch.testing.assert_close(soft_loss(s, t, "multiclass", 2.0), ref.mean() * 4)
    assert float(soft_loss(t, t, "multiclass", 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_cli_errors_are_one_line(world, monkeypatch, capsys, tmp_path):
    (tmp_path / "notrun").mkdir()
    (tmp_path / "notrun" / "config.json").write_text(json.dumps({"kind": "encoder"}))
    for args in (["prune", str(tmp_path / "notrun"), str(world["data"]), "-o", str(tmp_path / "o")],
                 ["distill", str(world["root"] / "resnet18"), str(tmp_path / "nodata"), "-o",
                  str(tmp_path / "o2")],
                 ["distill", str(world["root"] / "resnet18"), str(world["data"]), "-o", str(tmp_path / "o3"),
                  "--student-args", "{bad"]):
        code, out, err = _cli(monkeypatch, capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)


def test_cli_prune_prints_a_summary(world, monkeypatch, capsys, tmp_path):
    code, out, err = _cli(monkeypatch, capsys, "prune", str(world["root"] / "resnet18"), str(world["data"]),
                          "-o", str(tmp_path / "p"), "--steps", "2", "--batch-size", "8")
    assert code == 0, err
    assert "MACs" in out and "AUROC" in out and np.isfinite(open_run(tmp_path / "p").config()["macs_after"])
