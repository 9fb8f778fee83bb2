"""`medfm models import`: the format registry, auto-detection, the Hugging Face vision folders (parity with
transformers itself) and an imported encoder going through `adapt` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import medfm
from medfm.errors import ConfigError, InputError
from medfm.models.formats import detect_format, format_names, import_model

transformers = pytest.importorskip("transformers")

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY_HF = {
    "resnet": dict(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1]),
    "convnext": dict(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1]),
    "swin": dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], image_size=64, window_size=2),
    "clip_vision_model": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=64, patch_size=8),
    "siglip_vision_model": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, image_size=64, patch_size=8),
}


def _hf_folder(tmp_path, model_type, head=False):
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **TINY_HF[model_type])
    model = (AutoModelForImageClassification if head else AutoModel).from_config(cfg).eval()
    path = tmp_path / f"hf_{model_type}{'_cls' if head else ''}"
    model.save_pretrained(path)
    return path, model


def _normalised(x):
    return (x.expand(-1, 3, -1, -1) - MEAN) / STD


def test_every_declared_format_is_listed_and_has_a_kind():
    names = format_names()
    assert {"hf", "timm", "sam", "open_clip", "sam2", "xrv", "radimagenet", "monai_bundle"} <= set(names)
    res = CliRunner().invoke(_app(), ["models", "formats"])
    assert res.exit_code == 0 and "hf" in res.output and "encoder" in res.output


def _app():
    from medfm.cli.app import app

    return app


@pytest.mark.parametrize("model_type", sorted(TINY_HF))
def test_hf_vision_folder_matches_transformers(tmp_path, model_type):
    src, ref = _hf_folder(tmp_path, model_type)
    assert detect_format(src) == "hf"
    run, used = import_model(src, tmp_path / "run", img_size=64)
    assert used == "hf"
    enc = medfm.load_run(run).eval()
    assert enc.config["name"] == "hf_vision" and enc.in_chans == 1
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        out = ref(pixel_values=_normalised(x))
        diff = (enc(x) - out.pooler_output.flatten(1)).abs().max().item()
        feats = enc.forward_features(x)
    print(f"parity hf/{model_type}: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    assert [f.shape[1] for f in feats] == enc.feature_dims
    assert [64 // f.shape[-1] for f in feats] == enc.feature_strides
    card = (run / "README.md").read_text()
    assert "Imported with `medfm models import`" in card and "hf_vision" in card
    conf = json.loads((run / "config.json").read_text())
    assert conf["imported"] == {"format": "hf", "file": src.name, "model_type": model_type}


def test_classification_folder_drops_the_head_and_says_so(tmp_path):
    src, ref = _hf_folder(tmp_path, "convnext", head=True)
    run, _ = import_model(src, tmp_path / "run", img_size=64)
    enc = medfm.load_run(run).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        want = ref.convnext(pixel_values=_normalised(x)).pooler_output
    assert (enc(x) - want).abs().max() <= 1e-5
    assert json.loads((run / "metrics.json").read_text())["head_keys_dropped"] == 2


def test_native_vit_folders_still_become_medfm_vits(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    Dinov2Model(cfg).save_pretrained(tmp_path / "rad_dino")
    run, used = import_model(tmp_path / "rad_dino", tmp_path / "run")
    assert used == "hf" and medfm.load_run(run).config["name"].startswith("vit")


def test_timm_file_detected_and_imported(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    assert detect_format(tmp_path / "vit.safetensors") == "timm"
    res = CliRunner().invoke(_app(), ["models", "import", str(tmp_path / "vit.safetensors"),
                                      str(tmp_path / "run"), "--in-chans", "1"])
    assert res.exit_code == 0, res.output
    assert "format timm, kind encoder" in res.output
    assert medfm.load_run(tmp_path / "run").in_chans == 1


def test_sam_file_becomes_a_promptable_run(tmp_path):
    from safetensors.torch import save_file
    from test_sam import _random_state, official_sam_shapes

    save_file(_random_state(official_sam_shapes()), str(tmp_path / "medsam.safetensors"))
    assert detect_format(tmp_path / "medsam.safetensors") == "sam"
    run, _ = import_model(tmp_path / "medsam.safetensors", tmp_path / "run")
    model = medfm.load_run(run)
    masks, iou = model(torch.rand(1, 1, 32, 32), boxes=torch.tensor([[4.0, 4.0, 20.0, 20.0]]))
    assert masks.shape == (1, 3, 32, 32) and torch.isfinite(masks).all()


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        import_model(tmp_path / "missing", tmp_path / "run")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.safetensors"):
        import_model(junk, tmp_path / "run")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="unrecognised checkpoint format"):
        import_model(tmp_path / "folder", tmp_path / "run")
    with pytest.raises(ConfigError, match="Unknown import format 'nope'"):
        import_model(junk, tmp_path / "run", format="nope")
    res = CliRunner().invoke(_app(), ["models", "import", str(junk), str(tmp_path / "r"), "--format", "nope"])
    assert isinstance(res.exception, ConfigError)  # main() prints it as one line, exit code 2


@pytest.mark.slow
def test_imported_hf_encoder_goes_through_adapt(tmp_path):
    """The label-efficiency protocol on an imported checkpoint, end to end (linear probe + fine-tune)."""
    from test_adapt import make_prepared

    from medfm.tasks.adapt import AdaptConfig, Budget, run_adapt

    src, _ = _hf_folder(tmp_path, "convnext")
    run, _ = import_model(src, tmp_path / "enc", img_size=32)
    data = make_prepared(tmp_path / "d", n=60, size=32)
    cfg = AdaptConfig(methods=["linear", "finetune"], budgets=[Budget("fraction", 1.0)], seeds=1, steps=10,
                      batch_size=16)
    res = run_adapt(medfm.load_run(run), data, tmp_path / "out", cfg)
    assert set(res["method"]) == {"linear", "finetune"}
    assert res["auroc"].notna().all()
