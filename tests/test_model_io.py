"""Checkpoint I/O: medfm round trips, external timm / HF weights (numerically checked), bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from medfm.errors import InputError
from medfm.models import create_encoder, load_encoder, save_encoder


def _save_state(sd: dict[str, torch.Tensor], path) -> None:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_round_trip_run_dir_and_file(tmp_path, spatial_dims):
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", spatial_dims=spatial_dims, img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(2, 1, *([32] * spatial_dims))
    out = save_encoder(enc, tmp_path / "run")
    assert out == tmp_path / "run" / "model.safetensors"
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["medfm_encoder"]) == enc.config  # the file alone describes the model
    for src in (tmp_path / "run", out, save_encoder(enc, tmp_path / "other.safetensors")):
        loaded = load_encoder(src).eval()
        assert loaded.config == enc.config
        with torch.no_grad():
            assert torch.equal(loaded(x), enc(x))


def test_round_trip_cnn_and_hybrid(tmp_path):
    torch.manual_seed(0)
    for name, kw in [("convnext_lk_tiny", dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))),
                     ("hybrid_tiny", dict(conv_dims=(8, 16), conv_depths=(1, 1), embed_dim=32, depth=1,
                                          num_heads=2))]:
        enc = create_encoder(name, spatial_dims=3, img_size=32, **kw).eval()
        x = torch.randn(1, 1, 32, 32, 32)
        loaded = load_encoder(save_encoder(enc, tmp_path / name)).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), enc(x))
            assert all(torch.equal(a, b) for a, b in zip(loaded.forward_features(x), enc.forward_features(x)))


def test_channel_adaptation_preserves_grey_response(tmp_path):
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=2, pos_embed="learned").eval()
    save_encoder(enc, tmp_path / "run")
    rgb = load_encoder(tmp_path / "run", in_chans=3).eval()  # 1 -> 3: repeated filters / 3
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rgb(x.repeat(1, 3, 1, 1)), enc(x), atol=1e-5)
        bigger = load_encoder(tmp_path / "run", img_size=48)  # learned pos-emb interpolated 4x4 -> 6x6
        assert bigger.pos_embed.shape == (1, 36, 192) and bigger(torch.randn(1, 1, 48, 48)).shape == (1, 192)


def _timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                             num_classes=0).eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_vit_matches(tmp_path, fmt):
    src = _timm_vit()
    path = tmp_path / f"timm.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": src.state_dict()}, path)
    else:
        _save_state(src.state_dict(), path)
    enc = load_encoder(path).eval()
    assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads, enc.in_chans) == (192, 2, 3, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = src(x)
        assert ref.std() > 0.1
        assert torch.allclose(enc(x), ref, atol=1e-5)
        assert torch.allclose(enc.forward_tokens(enc.patch_tokens(x)), src.forward_features(x), atol=1e-5)
        grey = torch.randn(2, 1, 32, 32)
        mono = load_encoder(path, in_chans=1).eval()  # 3 -> 1: summed RGB filters
        assert torch.allclose(mono(grey), src(grey.repeat(1, 3, 1, 1)), atol=1e-5)
        resized = load_encoder(path, in_chans=1, img_size=64).eval()
        assert resized.grid == (4, 4) and resized(torch.randn(1, 1, 64, 64)).shape == (1, 192)


def test_timm_dinov2_with_registers_matches(tmp_path):
    import timm

    torch.manual_seed(0)  # no_embed_class layout: class/register tokens carry no position embedding
    src = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28, depth=2,
                            num_classes=0).eval()
    _save_state(src.state_dict(), tmp_path / "reg.safetensors")
    enc = load_encoder(tmp_path / "reg.safetensors").eval()
    assert enc.num_register_tokens == 4 and enc.blocks[0].attn.num_heads == 6
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(enc(x), src(x), atol=1e-5)


def test_timm_convnext_matches(tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("convnext_tiny", pretrained=False, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128),
                            num_classes=0).eval()
    _save_state(src.state_dict(), tmp_path / "cnx.safetensors")
    enc = load_encoder(tmp_path / "cnx.safetensors").eval()
    assert enc.family == "cnn" and enc.config["kernel_size"] == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(enc(x), src(x), atol=1e-5)
        mono = load_encoder(tmp_path / "cnx.safetensors", in_chans=1).eval()
        assert mono(torch.randn(1, 1, 64, 64)).shape == (1, 128)


@pytest.mark.parametrize("model_type", ["vit", "dinov2", "dinov2_with_registers"])
def test_hugging_face_dir_matches(tmp_path, model_type):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
    if model_type == "vit":
        src = tf.ViTModel(tf.ViTConfig(intermediate_size=96, **common)).eval()
    elif model_type == "dinov2":  # DINOv2 / RAD-DINO layout: LayerScale, mask token, eps 1e-6
        src = tf.Dinov2Model(tf.Dinov2Config(layerscale_value=0.5, **common)).eval()
    else:  # register tokens sit between the class token and the patches; medfm drops them from its output
        cfg = tf.Dinov2WithRegistersConfig(num_register_tokens=4, layerscale_value=0.5, **common)
        src = tf.Dinov2WithRegistersModel(cfg).eval()
    src.save_pretrained(tmp_path / "hf")
    enc = load_encoder(tmp_path / "hf").eval()
    assert enc.pos_embed_type == "learned" and enc.blocks[0].attn.num_heads == 2
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = src(pixel_values=x).last_hidden_state
        ref = torch.cat([ref[:, :1], ref[:, 1 + enc.num_register_tokens:]], dim=1)
        assert torch.allclose(enc(x), ref[:, 0], atol=1e-5)
        assert torch.allclose(enc.forward_tokens(enc.patch_tokens(x)), ref, atol=1e-5)
        mono = load_encoder(tmp_path / "hf", in_chans=1, img_size=56).eval()
        assert mono.grid == (4, 4) and mono(torch.randn(1, 1, 56, 56)).shape == (1, 32)


def test_cli_import_external(tmp_path):
    from medfm.cli.app import app

    _save_state(_timm_vit().state_dict(), tmp_path / "timm.safetensors")
    args = ["models", "import", str(tmp_path / "timm.safetensors"), str(tmp_path / "run"), "--in-chans", "1",
            "--img-size", "48"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    enc = load_encoder(tmp_path / "run")
    assert enc.in_chans == 1 and enc.img_size == (48, 48)


def test_bad_checkpoints_name_the_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(InputError, match="junk.safetensors.*not a readable safetensors"):
        load_encoder(junk)
    pth = tmp_path / "junk.pth"
    pth.write_bytes(b"\x80\x04garbage")
    with pytest.raises(InputError, match="junk.pth.*weights-only"):
        load_encoder(pth)
    notes = tmp_path / "notes.pth"
    torch.save({"epoch": 3}, notes)
    with pytest.raises(InputError, match="notes.pth.*state dict"):
        load_encoder(notes)
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": tmp_path}, evil)  # arbitrary objects are never unpickled
    with pytest.raises(InputError, match="evil.pth.*weights-only"):
        load_encoder(evil)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3)}, str(foreign))
    with pytest.raises(InputError, match="foreign.safetensors.*unrecognised checkpoint layout"):
        load_encoder(foreign)
    with pytest.raises(InputError, match="no such file"):
        load_encoder(tmp_path / "missing")
    with pytest.raises(InputError, match="not a run directory"):
        load_encoder(tmp_path)


def test_mismatched_medfm_checkpoint(tmp_path):
    enc = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=2)
    path = save_encoder(enc, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    extra = tmp_path / "extra.safetensors"
    save_file({**sd, "blocks.9.attn.qkv.weight": torch.zeros(1)}, str(extra), metadata=meta)
    with pytest.raises(InputError, match="extra.safetensors.*unexpected key.*blocks.9"):
        load_encoder(extra)
    wrong = tmp_path / "wrong.safetensors"
    save_file({**sd, "blocks.0.mlp.fc1.weight": torch.zeros(10, 192)}, str(wrong), metadata=meta)
    with pytest.raises(InputError, match="wrong.safetensors.*shape mismatch.*blocks.0.mlp.fc1.weight"):
        load_encoder(wrong)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in sd.items() if k != "norm.weight"}, str(missing), metadata=meta)
    with pytest.raises(InputError, match="missing.safetensors.*missing.*norm.weight"):
        load_encoder(missing)


class _Evil:
    """A pickle payload: unpickling it would run ``open(marker, "w")`` and create the marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint(tmp_path):
    import pickle

    marker = tmp_path / "PWNED"
    pth = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": _Evil(marker)}, pth)
    legacy = tmp_path / "evil_legacy.pt"  # a plain (non-zip) pickle, the older torch format
    legacy.write_bytes(pickle.dumps({"payload": _Evil(marker)}))
    return marker, [pth, legacy]


def test_malicious_pickle_is_refused_without_running(tmp_path):
    import pickle

    from medfm.models.checkpoint import read_torch_weights
    from medfm.models.io import read_torch_checkpoint
    from medfm.models.seg.sam import read_state_dict

    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))  # the payload is live: plain unpickling runs it
    assert control.exists()
    marker, files = _evil_checkpoint(tmp_path)
    for f in files:
        for reader in (read_torch_weights, read_torch_checkpoint, read_state_dict, load_encoder):
            with pytest.raises(InputError) as err:
                reader(f)
            msg = str(err.value)
            assert msg == f"{f}: refused: not a weights-only checkpoint; loading it could execute code"
            assert "weights_only=False" not in msg
    assert not marker.exists()


def test_truncated_torch_file_is_one_line(tmp_path):
    from medfm.models.checkpoint import read_torch_weights

    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(64)}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(InputError, match=r"cut\.pth: not a readable weights-only torch checkpoint") as err:
        read_torch_weights(cut)
    assert "\n" not in str(err.value)
    assert read_torch_weights(good)["w"].shape == (64,)


def test_cli_refuses_malicious_pickle(tmp_path):
    import subprocess
    import sys

    marker, files = _evil_checkpoint(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "medfm.cli.app", "models", "import", str(files[0]), str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    refused = "refused: not a weights-only checkpoint; loading it could execute code"
    assert r.stderr.strip() == f"error: {files[0]}: {refused}"
    assert "Traceback" not in r.stderr + r.stdout
    assert not marker.exists() and not (tmp_path / "run").exists()
