"""MONAI bundle import: parity of the medfm run with the MONAI network itself, on tiny random weights."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SegResNet, SwinUNETR

import medfm
from medfm.errors import ConfigError, InputError
from medfm.models.formats import detect_format, get_format, import_model

TOL = 1e-5


def _randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (norms too), so parity is not helped by default inits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def _bundle(root: Path, inference: dict | str, sd: object | None, weights: str = "model.pt",
            labels: dict | None = None, yaml: bool = False) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    meta = {"name": "tiny_test_bundle", "version": "0.1.2", "monai_version": "1.6.1",
            "network_data_format": {"inputs": {"image": {"num_channels": 1}},
                                    "outputs": {"pred": {"channel_def": labels or {}}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    if yaml:
        import yaml as y

        (root / "configs" / "inference.yaml").write_text(y.safe_dump(inference))
    else:
        (root / "configs" / "inference.json").write_text(
            inference if isinstance(inference, str) else json.dumps(inference))
    if sd is not None:
        if weights.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(sd, str(root / "models" / weights))  # type: ignore[arg-type]
        else:
            torch.save(sd, root / "models" / weights)
    return root


SWIN_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "feature_size": 12,
             "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4], "use_checkpoint": False}


def _swin_config(**over) -> dict:
    net = {"_target_": "SwinUNETR", **SWIN_ARGS, "out_channels": "@num_classes", "img_size": 64, **over}
    return {
        "imports": ["$import glob"],
        "num_classes": 3,
        "device": "$torch.device('cpu')",
        "network_def": net,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -175, "a_max": 250,
             "b_min": -1.0, "b_max": 1.0, "clip": True},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 64], "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
    }


@pytest.fixture(scope="module")
def swin() -> SwinUNETR:
    torch.manual_seed(0)
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in SWIN_ARGS.items()}
    return _randomise(SwinUNETR(**args))


def test_swinunetr_bundle_parity(tmp_path, swin):
    src = _bundle(tmp_path / "swin_bundle", _swin_config(), swin.state_dict(),
                  labels={"0": "background", "1": "liver", "2": "spleen"})
    assert detect_format(src) == "monai_bundle"
    out, fmt = import_model(src, tmp_path / "run")
    assert fmt == "monai_bundle"
    model = medfm.load_run(out)
    conf = json.loads((out / "config.json").read_text())
    assert conf["kind"] == "segmenter" and conf["network"]["class"] == "SwinUNETR"
    assert conf["network"]["args"]["out_channels"] == 3  # @num_classes resolved to its literal
    assert conf["class_names"] == ["liver", "spleen"] and conf["patch"] == [64, 64, 64]
    assert conf["preprocessing"]["window"] == [-175.0, 250.0]
    assert conf["preprocessing"]["normalisation"] == "window"
    assert conf["preprocessing"]["spacing"] == [1.5, 1.5, 2.0]
    assert conf["network"]["input_range"] == [-1.0, 1.0]
    assert conf["bundle"]["name"] == "tiny_test_bundle" and conf["bundle"]["activation"] == "softmax"
    card = (out / "README.md").read_text()
    assert "tiny_test_bundle" in card and "Orientationd" in card and "monai_bundle" in card

    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(x), swin(x * 2.0 - 1.0)  # medfm feeds [0, 1]; the bundle's range is -1..1
    diff = (ours - ref).abs().max().item()
    print(f"monai_bundle SwinUNETR max abs diff {diff:.3g}")
    assert ours.shape == (1, 3, 64, 64, 64) and diff <= TOL

    # medfm's segment inference applies it: a sliding window over a volume larger than the window
    from monai.inferers import sliding_window_inference

    from medfm.tasks.segment.infer import predict_logits

    big = torch.rand(1, 1, 64, 64, 80, generator=torch.Generator().manual_seed(2))
    got = predict_logits(model, big, roi_size=conf["patch"])
    with torch.no_grad():
        want = sliding_window_inference(big * 2 - 1, [64, 64, 64], 4, swin, overlap=0.25, mode="gaussian")
    sw_diff = (got - want).abs().max().item()
    print(f"monai_bundle SwinUNETR sliding-window max abs diff {sw_diff:.3g}")
    assert sw_diff <= TOL


def test_swinunetr_encoder_only(tmp_path, swin):
    src = _bundle(tmp_path / "b", _swin_config(), {"model": swin.state_dict()},
                  weights="model.pt")
    out, _ = import_model(src, tmp_path / "enc", as_encoder=True)
    enc = medfm.load_run(out)
    conf = json.loads((out / "config.json").read_text())
    assert conf["kind"] == "encoder" and conf["encoder"]["name"] == "swin_tiny"
    assert conf["encoder"]["embed_dim"] == 12 and conf["encoder"]["depths"] == [1, 1, 1, 1]
    assert conf["imported"]["format"] == "monai_bundle"
    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = enc.forward_features(x)
        ref = swin.swinViT(x, normalize=True)[1:]
        pooled = enc(x)
    diff = max((a - b).abs().max().item() for a, b in zip(ours, ref, strict=True))
    print(f"monai_bundle SwinUNETR encoder (swin_tiny) max abs diff {diff:.3g}")
    assert diff <= TOL and pooled.shape == (1, 12 * 16)
    assert [f.shape[1] for f in ours] == enc.feature_dims


def test_segresnet_yaml_wrapped_parity_and_predict(tmp_path):
    torch.manual_seed(0)
    net = _randomise(SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2), seed=4)
    cfg = {
        "network_def": {"_target_": "monai.networks.nets.SegResNet", "spatial_dims": 3, "init_filters": 8,
                        "in_channels": 1, "out_channels": 2, "blocks_down": [1, 2, 2, 4],
                        "blocks_up": [1, 1, 1], "dropout_prob": 0.2},
        "preprocessing": {"transforms": [
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32]},
    }
    src = _bundle(tmp_path / "seg", cfg, {"state_dict": net.state_dict()}, yaml=True,
                  labels={"0": "background", "1": "tumour"})
    assert detect_format(src) == "monai_bundle"
    out, _ = import_model(src, tmp_path / "run")
    model = medfm.load_run(out)
    x = torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (model(x) - net(x)).abs().max().item()
    print(f"monai_bundle SegResNet max abs diff {diff:.3g}")
    assert diff <= TOL
    conf = json.loads((out / "config.json").read_text())
    assert conf["class_names"] == ["tumour"] and conf["network"]["input_range"] == [0.0, 1.0]
    assert any("NormalizeIntensityd" in m for m in conf["bundle"]["manual"])
    assert "NormalizeIntensityd" in (out / "README.md").read_text()

    # `medfm segment predict` end to end on a raw NIfTI manifest
    import nibabel as nib
    import numpy as np

    from medfm.tasks.segment.jobs import predict_run

    data = tmp_path / "data"
    data.mkdir()
    vol = np.random.default_rng(0).normal(size=(40, 36, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), data / "img.nii.gz")
    nib.save(nib.Nifti1Image((vol > 1).astype(np.uint8), np.eye(4)), data / "mask.nii.gz")
    (data / "manifest.csv").write_text("image,mask,split\nimg.nii.gz,mask.nii.gz,test\n")
    assert predict_run(out, data, tmp_path / "masks") == 1
    mask = nib.load(next((tmp_path / "masks").glob("*_mask.nii.gz"))).get_fdata()
    assert mask.shape == (40, 36, 32)


def test_safetensors_weights_and_expression_arg(tmp_path):
    net = _randomise(SegResNet(init_filters=8, out_channels=3), seed=6)
    cfg = {"labels": ["a", "b", "c"],
           "network_def": {"_target_": "SegResNet", "init_filters": 8, "out_channels": "$len(@labels)"}}
    src = _bundle(tmp_path / "b", cfg, net.state_dict(), weights="model.safetensors")
    with pytest.raises(InputError, match="'out_channels' is an expression") as e:
        import_model(src, tmp_path / "run")
    assert "inference.json" in str(e.value) and "\n" not in str(e.value)
    out, _ = import_model(src, tmp_path / "run", net_args=["out_channels=3"])
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert (medfm.load_run(out)(x) - net(x)).abs().max().item() <= TOL
    # a wrong override names the keys that do not fit
    with pytest.raises(InputError, match="weights do not fit"):
        import_model(src, tmp_path / "run2", net_args={"out_channels": 4})


def test_refusals(tmp_path, swin):
    base = _swin_config()
    # TorchScript only
    src = _bundle(tmp_path / "ts", base, None)
    (src / "models" / "model.ts").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InputError, match="TorchScript") as e:
        import_model(src, tmp_path / "o1")
    assert "model.ts" in str(e.value) and "\n" not in str(e.value)
    # a pickled object (not weights)
    src = _bundle(tmp_path / "pk", base, None)

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (src / "models" / "model.pt").write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(InputError, match="refused") as e:
        import_model(src, tmp_path / "o2")
    assert "model.pt" in str(e.value) and "state_dict" in str(e.value)
    # a pickled whole nn.Module
    src = _bundle(tmp_path / "mod", base, None)
    torch.save(torch.nn.Linear(2, 2), src / "models" / "model.pt")
    with pytest.raises(InputError, match="refused"):
        import_model(src, tmp_path / "o3")
    # truncated weights
    src = _bundle(tmp_path / "tr", base, swin.state_dict())
    w = src / "models" / "model.pt"
    w.write_bytes(w.read_bytes()[:2000])
    with pytest.raises(InputError) as e:
        import_model(src, tmp_path / "o4")
    assert "model.pt" in str(e.value)
    # garbage safetensors
    src = _bundle(tmp_path / "gs", base, None)
    (src / "models" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="model.safetensors"):
        import_model(src, tmp_path / "o5")
    # broken config JSON
    src = _bundle(tmp_path / "bad", "{not json", swin.state_dict())
    with pytest.raises(InputError, match="inference.json"):
        import_model(src, tmp_path / "o6")
    # a class that is not a MONAI network; encoder-only for a non-Swin network
    src = _bundle(tmp_path / "cls", {"network_def": {"_target_": "os.system", "command": "ls"}}, {})
    with pytest.raises(ConfigError, match="monai.networks.nets"):
        import_model(src, tmp_path / "o7")
    seg = SegResNet(init_filters=8)
    src = _bundle(tmp_path / "unk", {"network_def": {"_target_": "SegResNet", "colour": "blue"}},
                  seg.state_dict())
    with pytest.raises(InputError, match="no arg.*colour"):
        import_model(src, tmp_path / "o9")
    src = _bundle(tmp_path / "segenc", {"network_def": {"_target_": "SegResNet", "init_filters": 8}},
                  seg.state_dict())
    with pytest.raises(ConfigError, match="SwinUNETR"):
        import_model(src, tmp_path / "o8", as_encoder=True)


def test_detection_is_specific(tmp_path, swin):
    det = get_format("monai_bundle").detect
    src = _bundle(tmp_path / "bundle", _swin_config(), swin.state_dict())
    assert det(src) and det(src / "models" / "model.pt") and det(src / "configs" / "inference.json")
    out, fmt = import_model(src / "models" / "model.pt", tmp_path / "from_file")  # a file of the bundle
    assert fmt == "monai_bundle" and (out / "seg_model.safetensors").is_file()
    # not ours: a bare state dict, a Hugging Face folder, garbage, a missing path, a bundle without config
    torch.save(swin.state_dict(), tmp_path / "bare.pt")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 64)
    half = tmp_path / "half" / "configs"
    half.mkdir(parents=True)
    (half / "metadata.json").write_text("{}")
    for p in (tmp_path / "bare.pt", hf, tmp_path / "junk.bin", tmp_path / "nope", half.parent):
        assert not det(p), p
    try:  # a bare SwinUNETR state dict is no bundle (another format may or may not claim it)
        assert detect_format(tmp_path / "bare.pt") != "monai_bundle"
    except InputError as e:
        assert "unrecognised" in str(e)
