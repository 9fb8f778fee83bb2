"""`medfm models import` for torchxrayvision classifiers (format xrv) and RadImageNet ResNets (radimagenet).

Parity is measured against the source libraries themselves (torchxrayvision's DenseNet / ResNet forward,
torchvision's ResNet-50) on random-weight checkpoints built here in the source formats.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import medfm
from medfm.errors import ConfigError, InputError
from medfm.models import create_encoder
from medfm.models.formats import detect_format, get_format, import_model

xrv = pytest.importorskip("torchxrayvision")
tvm = pytest.importorskip("torchvision.models")

TOL = 1e-5
# A tiny DenseNet in xrv's layout: same code path as DenseNet-121, a fraction of the weights.
TINY_DN = dict(growth_rate=8, block_config=(2, 1, 2, 1), num_init_features=16, bn_size=2)


def _randomise_bn(model: nn.Module, calibrate_on: torch.Tensor | None = None, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm terms (fresh ones are the identity in eval mode): statistics measured on
    ``calibrate_on`` (so activations and logits stay O(1), as in a trained net) or random, and random
    affine terms."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if calibrate_on is not None:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration pass
            model.train()(calibrate_on)
            for m in bns:
                m.momentum = 0.1
    return model.eval()


def _images(n: int = 4, side: int = 64, seed: int = 1) -> torch.Tensor:
    """Random images with per-image brightness and contrast, so that outputs differ between images."""
    g = torch.Generator().manual_seed(seed)
    lo, span = torch.rand(n, 1, 1, 1, generator=g) * 0.5, torch.rand(n, 1, 1, 1, generator=g) * 0.5 + 0.1
    return lo + span * torch.rand(n, 1, side, side, generator=g)


def _xrv_scaled(n: int = 16) -> torch.Tensor:
    return _images(n, seed=7) * 2048 - 1024


def _xrv_densenet(op_threshs: torch.Tensor | None = None) -> nn.Module:
    m = xrv.models.DenseNet(num_classes=18, in_channels=1, **TINY_DN)
    # xrv's own init zeroes every bias: give the classifier one so dropped rows would show.
    nn.init.normal_(m.classifier.bias, std=0.5)
    m.op_threshs = op_threshs
    return _randomise_bn(m, _xrv_scaled())


def _medians_with_nan(model: nn.Module, x: torch.Tensor, nan_at: list[int]) -> torch.Tensor:
    """Operating points at the median output (so decisions split both ways), NaN where xrv has none."""
    with torch.no_grad():
        p = torch.sigmoid(model(x * 2048 - 1024))
    op = p.median(dim=0).values.clone()
    op[nan_at] = float("nan")
    return op


def _xrv_resnet(seed: int = 0) -> nn.Module:
    """xrv.models.ResNet as xrv builds it (a torchvision ResNet-50 layout with a 1-channel stem, 18
    outputs), without its download: the same module, its own forward."""
    torch.manual_seed(seed)
    m = xrv.models.ResNet.__new__(xrv.models.ResNet)
    nn.Module.__init__(m)
    m.weights, m.apply_sigmoid = "resnet50-res512-all", False
    m.model = tvm.resnet.ResNet(tvm.resnet.Bottleneck, [1, 1, 1, 1], num_classes=18)
    m.model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    m.targets = m.pathologies = list(xrv.datasets.default_pathologies)
    nn.init.normal_(m.model.fc.bias, std=0.5)
    return _randomise_bn(m, _xrv_scaled())


# ---------------------------------------------------------------- the encoders


def test_densenet_encoder_shapes_groups_and_2d_only() -> None:
    enc = create_encoder("densenet121", img_size=64, **TINY_DN).eval()
    feats = enc.forward_features(_images(2))
    assert [f.shape[1] for f in feats] == enc.feature_dims
    assert [64 // f.shape[-1] for f in feats] == enc.feature_strides == [4, 8, 16, 32]
    assert enc(_images(2)).shape == (2, enc.embed_dim)
    seen = [id(p) for g in enc.layer_groups() for p in g.parameters()]
    assert len(seen) == len(set(seen)) == len(list(enc.parameters()))
    assert create_encoder("densenet121").embed_dim == 1024
    rn = create_encoder("tv_resnet50", img_size=64, layers=(1, 1, 1, 1))
    assert rn.feature_dims == [256, 512, 1024, 2048] and len(rn.layer_groups()) == 5
    for name in ("densenet121", "tv_resnet50"):
        with pytest.raises(ConfigError, match="2D only"):
            create_encoder(name, spatial_dims=3)
    with pytest.raises(ConfigError, match="mean needs 1 or in_chans"):
        create_encoder("tv_resnet18", in_chans=1, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------- xrv DenseNet


def test_xrv_densenet_parity_thresholds_and_untrained_outputs(tmp_path: Path) -> None:
    x = _images(8)
    model = _xrv_densenet()
    untrained = [2, 5, 6, 9]  # like xrv's chex weights: '' labels, NaN operating points
    op = _medians_with_nan(model, x, untrained)
    model.op_threshs = op
    src = tmp_path / "xrv-densenet.pt"
    torch.save(model.state_dict(), src)  # what xrv users save: features.*, classifier.*, op_threshs

    assert detect_format(src) == "xrv"
    out, fmt = import_model(src, tmp_path / "run", img_size=64)
    assert fmt == "xrv"
    clf = medfm.load_run(out)
    keep = [i for i in range(18) if i not in untrained]
    assert clf.task == "multilabel"
    assert clf.classes == [xrv.datasets.default_pathologies[i] for i in keep]
    assert clf.threshold == pytest.approx([float(op[i]) for i in keep], abs=0)

    with torch.no_grad():
        ours = clf(x)
        model.op_threshs = None  # raw logits
        theirs = model(x * 2048 - 1024)[:, keep]
        model.op_threshs = op  # xrv's calibrated output: op_norm, 0.5 at the operating point
        normed = model(x * 2048 - 1024)[:, keep]
    diff = float((ours - theirs).abs().max())
    print(f"xrv DenseNet logits max abs diff: {diff:.2e}")
    assert diff < TOL
    decided = (clf.predict_proba(x) >= torch.tensor(clf.threshold)).numpy()
    assert np.array_equal(decided, (normed >= 0.5).numpy())
    assert 0 < decided.mean() < 1  # the thresholds split the cases: the comparison means something

    conf = medfm.rundir.open_run(out).config()
    assert conf["imported"]["dropped_untrained_outputs"] == untrained
    assert conf["imported"]["source_outputs"] == keep
    assert conf["encoder"]["mean"] == [0.5] and conf["encoder"]["std"] == [1 / 2048]
    metrics = medfm.rundir.open_run(out).metrics()
    assert metrics["parity_max_abs_diff"] < TOL and "torchxrayvision" in metrics["parity_reference"]
    card = (out / "README.md").read_text()
    assert "xrv" in card and "xrv-densenet.pt" in card


def test_xrv_densenet121_full_size_parity(tmp_path: Path) -> None:
    """The real architecture (xrv's default DenseNet-121, 18 outputs) at a small input size."""
    model = xrv.models.DenseNet(num_classes=18)
    nn.init.normal_(model.classifier.bias, std=0.5)
    _randomise_bn(model, _xrv_scaled(8))
    torch.save(model.state_dict(), tmp_path / "dn121.pt")
    out, _ = import_model(tmp_path / "dn121.pt", tmp_path / "run", img_size=64)
    clf = medfm.load_run(out)
    assert clf.encoder.config["name"] == "densenet121" and len(clf.classes) == 18
    x = _images(3)
    with torch.no_grad():
        diff = float((clf(x) - model(x * 2048 - 1024)).abs().max())
    print(f"xrv DenseNet-121 (full size) logits max abs diff: {diff:.2e}")
    assert diff < TOL
    spec = medfm.rundir.open_run(out).config()["preprocessing"]
    assert spec["size"] == 64 and spec["resize_mode"] == "crop"


def test_xrv_densenet_labels_from_weight_set_or_option(tmp_path: Path) -> None:
    model = _xrv_densenet()
    src = tmp_path / "plain.safetensors"  # no op_threshs: a model built without weights=
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    assert detect_format(src) == "xrv"
    out, _ = import_model(src, tmp_path / "nih", weights="densenet121-res224-nih", img_size=64)
    clf = medfm.load_run(out)
    table = xrv.models.model_urls["densenet121-res224-nih"]
    assert clf.classes == [n for n in table["labels"] if n]
    assert clf.threshold == pytest.approx([float(np.float32(t)) for t in table["op_threshs"][:14]])

    names = ",".join(f"finding{i}" if i % 2 == 0 else "" for i in range(18))
    out, _ = import_model(src, tmp_path / "named", format="xrv", labels=names, img_size=64)
    clf = medfm.load_run(out)
    assert clf.classes == [f"finding{i}" for i in range(0, 18, 2)] and clf.threshold == [0.5] * 9
    with torch.no_grad():
        diff = float((clf(_images()) - model(_images() * 2048 - 1024)[:, 0::2]).abs().max())
    assert diff < TOL
    with pytest.raises(ConfigError, match="3 labels for a checkpoint with 18"):
        import_model(src, tmp_path / "bad", format="xrv", labels="a,b,c")


def test_imported_classifier_predicts_images(tmp_path: Path) -> None:
    from PIL import Image

    from medfm.predict.model import load_predictor
    from medfm.predict.run import predict
    from medfm.tasks.adapt.classifier import predict_arrays

    x = _images(6)
    model = _xrv_densenet()
    model.op_threshs = _medians_with_nan(model, x, [14, 15])
    torch.save(model.state_dict(), tmp_path / "xrv.pt")
    out, _ = import_model(tmp_path / "xrv.pt", tmp_path / "run", format="xrv", img_size=64)
    clf = medfm.load_run(out)

    imgs = np.random.default_rng(0).integers(0, 256, (3, 1, 80, 80), dtype=np.uint8)  # resized to 64
    probs, feats = predict_arrays(clf, imgs)
    assert probs.shape == (3, 16) and feats.shape == (3, clf.encoder.embed_dim)
    pred = load_predictor(out)
    assert pred.task == "multilabel" and pred.threshold == clf.threshold
    cols = pred.columns(pred.infer(torch.as_tensor(imgs) / 255.0)[0])
    assert set(cols) == {f"{p}_{c}" for c in clf.classes for p in ("prob", "pred")}

    files = []
    for i, im in enumerate(imgs):
        files.append(tmp_path / f"cxr{i}.png")
        Image.fromarray(im[0]).save(files[-1])
    result = predict(out, files, tmp_path / "pred", keep_identifiers=True, progress=False)
    import pandas as pd

    table = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert len(table) == 3 and f"pred_{clf.classes[0]}" in table.columns, result


# ---------------------------------------------------------------- xrv ResNet


@pytest.mark.parametrize("layout", ["release", "module"])
def test_xrv_resnet_parity(tmp_path: Path, layout: str) -> None:
    x = _images(6)
    model = _xrv_resnet()
    with torch.no_grad():
        p = torch.sigmoid(model(x * 2048 - 1024))
    op = p.median(dim=0).values.clone()
    op[[14, 17]] = float("nan")  # as in xrv's resnet50-res512-all table
    src = tmp_path / f"xrv-resnet-{layout}.pt"
    if layout == "release":  # xrv's release file: the torchvision model's state dict
        torch.save(model.model.state_dict(), src)
    else:  # xrv.models.ResNet(...).state_dict(): model.* and the op_threshs buffer
        model.register_buffer("op_threshs", op)
        torch.save(model.state_dict(), src)
    assert detect_format(src) == "xrv"
    assert not get_format("radimagenet").detect(src)
    opts = {"weights": "resnet50-res512-all"} if layout == "release" else {}
    out, _ = import_model(src, tmp_path / "run", img_size=64, **opts)
    clf = medfm.load_run(out)
    assert clf.encoder.config["name"] == "tv_resnet50" and clf.encoder.config["layers"] == [1, 1, 1, 1]
    names = list(xrv.datasets.default_pathologies)
    trained = [n for i, n in enumerate(names) if i not in (14, 17)]  # default names: NaN point = untrained
    assert clf.classes == (names if layout == "release" else trained)
    keep = medfm.rundir.open_run(out).config()["imported"]["source_outputs"]
    with torch.no_grad():
        ours = clf(x)
        model.op_threshs = None
        theirs = model(x * 2048 - 1024)[:, keep]
    diff = float((ours - theirs).abs().max())
    print(f"xrv ResNet ({layout}) logits max abs diff: {diff:.2e}")
    assert diff < TOL
    if layout == "module":
        model.op_threshs = op
        with torch.no_grad():
            normed = model(x * 2048 - 1024)[:, keep]
        decided = (clf.predict_proba(x) >= torch.tensor(clf.threshold)).numpy()
        assert np.array_equal(decided, (normed >= 0.5).numpy()) and 0 < decided.mean() < 1
    else:  # xrv's table: 'Lung Lesion' / 'Enlarged Cardiomediastinum' have no operating point -> 0.5
        conf = medfm.rundir.open_run(out).config()
        assert conf["imported"]["no_operating_point"] == ["Lung Lesion", "Enlarged Cardiomediastinum"]
        assert clf.threshold[14] == clf.threshold[17] == 0.5


# ---------------------------------------------------------------- RadImageNet


def _tv_features(net: nn.Module, x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """torchvision's ResNet trunk + global average pool on the ImageNet-normalised RGB image."""
    rgb = x.repeat(1, 3, 1, 1)
    rgb = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    trunk = nn.Sequential(*list(net.children())[:-1])
    return trunk(rgb).flatten(1)


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_radimagenet_resnet50_parity_in_its_layouts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _randomise_bn(tvm.resnet50())
    x = _images(3)
    with torch.no_grad():
        ref = _tv_features(net, x, *IMAGENET)
    sd = net.state_dict()
    # RadImageNet's PyTorch example: backbone = nn.Sequential(*list(resnet50().children())[:9])
    backbone = nn.Sequential(*list(net.children())[:9])
    files = {
        "radimagenet_backbone.pt": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
        "resnet50_fc.pth": sd,
    }
    for name, state in files.items():
        torch.save(state, tmp_path / name)
    no_fc = {f"module.{k}": v.contiguous() for k, v in sd.items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    save_file(no_fc, str(tmp_path / "radimagenet.safetensors"))
    for name in [*files, "radimagenet.safetensors"]:
        src = tmp_path / name
        assert detect_format(src) == "radimagenet", name
        assert not get_format("xrv").detect(src)
        out, fmt = import_model(src, tmp_path / f"run-{src.stem}", img_size=64)
        enc = medfm.load_run(out)
        assert enc.config["name"] == "tv_resnet50" and enc.in_chans == 3
        assert enc.config["mean"] == list(IMAGENET[0]) and enc.config["std"] == list(IMAGENET[1])
        with torch.no_grad():
            diff = float((enc.eval()(x) - ref).abs().max())
        print(f"radimagenet {name}: pooled features max abs diff {diff:.2e}")
        assert diff < TOL
        conf = medfm.rundir.open_run(out).config()
        assert conf["kind"] == "encoder" and conf["imported"]["format"] == "radimagenet"
        dropped = "fc (1000 outputs)" if name == "resnet50_fc.pth" else "nothing"
        assert conf["imported"]["dropped"] == dropped


def test_radimagenet_depth_from_keys_and_options(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _randomise_bn(tvm.resnet18())
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    out, _ = import_model(tmp_path / "r18.pt", tmp_path / "run", format="radimagenet", img_size=64,
                          mean="0.5,0.5,0.5", std="0.25,0.25,0.25")
    enc = medfm.load_run(out)
    assert enc.config["name"] == "tv_resnet18"
    x = _images(2)
    with torch.no_grad():
        diff = float((enc.eval()(x) - _tv_features(net, x, (0.5,) * 3, (0.25,) * 3)).abs().max())
    assert diff < TOL
    out, _ = import_model(tmp_path / "r18.pt", tmp_path / "raw", format="radimagenet",
                          mean="none", std="none")
    assert medfm.load_run(out).config["mean"] is None


# ---------------------------------------------------------------- detection and bad files


def test_detectors_do_not_claim_other_files(tmp_path: Path) -> None:
    xrv_file = tmp_path / "dn.pt"
    torch.save(_xrv_densenet().state_dict(), xrv_file)
    imagenet_dn = tmp_path / "imagenet_densenet.pt"  # torchvision's RGB DenseNet: not an xrv model
    torch.save(tvm.densenet121().state_dict(), imagenet_dn)
    vit = tmp_path / "vit.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(8, 3, 16, 16), "pos_embed": torch.zeros(1, 5, 8)},
              str(vit))
    medfm_run = tmp_path / "enc"
    from medfm.models.formats.runs import write_encoder_run

    write_encoder_run(create_encoder("tv_resnet18", img_size=32), medfm_run, {"format": "test", "file": "x"})
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    torch.save(tvm.resnet18().state_dict(), timm_dir / "pytorch_model.bin")
    (timm_dir / "config.json").write_text('{"architecture": "resnet18", "num_classes": 1000}')
    xrv_fmt, rin_fmt = get_format("xrv"), get_format("radimagenet")
    assert xrv_fmt.detect(xrv_file) and not rin_fmt.detect(xrv_file)
    for p in (imagenet_dn, vit, medfm_run, medfm_run / "model.safetensors", timm_dir / "pytorch_model.bin",
              timm_dir, tmp_path / "missing.pt"):
        assert not xrv_fmt.detect(p), p
        assert not rin_fmt.detect(p), p


def test_bad_files_are_one_line_input_errors(tmp_path: Path) -> None:
    good = tmp_path / "dn.pt"
    torch.save(_xrv_densenet().state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 10)
    for fmt in ("xrv", "radimagenet"):
        for bad in (truncated, garbage):
            with pytest.raises(InputError) as e:
                import_model(bad, tmp_path / "out", format=fmt)
            assert bad.name in str(e.value) and "\n" not in str(e.value)
    for bad in (truncated, garbage):  # auto: no format claims it, the error says what is wrong with it
        with pytest.raises(InputError, match=bad.name) as e:
            import_model(bad, tmp_path / "out")
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


class _NotWeights:
    """A pickled object that is not a state dict (weights-only unpickling must refuse it)."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_pickled_files_are_refused_with_a_recipe(tmp_path: Path) -> None:
    obj = tmp_path / "object.pt"
    torch.save({"model": _NotWeights()}, obj)
    for fmt in ("xrv", "radimagenet"):
        with pytest.raises(InputError, match="refused") as e:
            import_model(obj, tmp_path / "out", format=fmt)
        assert "object.pt" in str(e.value) and "\n" not in str(e.value)
    # xrv's DenseNet release files are whole pickled modules: claimed by name, refused with the recipe.
    release = tmp_path / "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
    torch.save(_xrv_densenet(), release)
    assert detect_format(release) == "xrv"
    with pytest.raises(InputError, match="refused.*torchxrayvision.*state_dict") as e:
        import_model(release, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_op_threshs_nan_default_labels_mark_untrained() -> None:
    from medfm.models.formats.xrv import XRV_PATHOLOGIES, _outputs

    assert XRV_PATHOLOGIES == list(xrv.datasets.default_pathologies)
    op = torch.full((18,), 0.3)
    op[[3, 4]] = math.nan
    names, ops, _ = _outputs(18, None, None, op)
    assert names[3] == names[4] == "" and names[0] == "Atelectasis" and ops is not None
    with pytest.raises(ConfigError, match="not xrv's 18"):
        _outputs(5, None, None, None)
