"""Import of SAM 2 / SAM 2.1 / MedSAM2 checkpoints (format ``sam2``): parity with the sam2 library's own
single-image predictor on tiny random-weight models, the skipped memory keys, detection and bad files."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sam2")

from medfm.errors import ConfigError, InputError  # noqa: E402
from medfm.models.formats import detect_format, import_model  # noqa: E402

TOL = 1e-5
S = 128  # tiny image size: stride-16 grid of 8x8
TINY_OPTS = {"num_heads": 1, "global_att_blocks": [4], "window_spec": [4, 4, 4, 2], "img_size": S}


def tiny_sam2(image_size: int = S, d: int = 32, embed: int = 8, seed: int = 0) -> torch.nn.Module:
    """A complete SAM2Base (memory modules included, SAM 2.1 flags) with a 4-stage Hiera of width 8."""
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam.transformer import RoPEAttention
    from sam2.modeling.sam2_base import SAM2Base

    torch.manual_seed(seed)
    trunk = Hiera(embed_dim=embed, num_heads=1, stages=(1, 2, 2, 1), global_att_blocks=(4,),
                  window_pos_embed_bkg_spatial_size=(4, 4), window_spec=(4, 4, 4, 2))
    neck = FpnNeck(PositionEmbeddingSine(d, normalize=True, scale=None, temperature=10000), d,
                   trunk.channel_list, fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
    g = image_size // 16

    def att(**kw):
        return RoPEAttention(rope_theta=10000.0, feat_sizes=[g, g], embedding_dim=d, num_heads=1,
                             downsample_rate=1, dropout=0.1, **kw)

    layer = MemoryAttentionLayer(
        activation="relu", cross_attention=att(rope_k_repeat=True, kv_in_dim=16), d_model=d,
        dim_feedforward=64, dropout=0.1, pos_enc_at_attn=False, pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False, self_attention=att(),
    )
    mem_enc = MemoryEncoder(
        16, MaskDownSampler(embed_dim=d, kernel_size=3, stride=2, padding=1),
        Fuser(CXBlock(d, 7, 3, layer_scale_init_value=1e-6, use_dwconv=True), 1),
        PositionEmbeddingSine(16, normalize=True, scale=None, temperature=10000), in_dim=d,
    )
    model = SAM2Base(
        ImageEncoder(trunk, neck, scalp=1), MemoryAttention(d, True, layer, 1), mem_enc,
        image_size=image_size,
        use_mask_input_as_output_without_sam=True, directly_add_no_mem_embed=True, no_obj_embed_spatial=True,
        use_high_res_features_in_sam=True, multimask_output_in_sam=True, iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True, add_tpos_enc_to_obj_ptrs=True, proj_tpos_enc_in_obj_ptrs=True,
        use_signed_tpos_enc_to_obj_ptrs=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True, use_multimask_token_for_obj_ptr=True, use_mlp_for_obj_ptr_proj=True,
        # what build_sam2 sets for image models (apply_postprocessing=True)
        sam_mask_decoder_extra_args={"dynamic_multimask_via_stability": True,
                                     "dynamic_multimask_stability_delta": 0.05,
                                     "dynamic_multimask_stability_thresh": 0.98},
    )
    with torch.no_grad():  # many SAM 2 tensors start at zero / one: random everywhere for a real check
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def predictor(model: torch.nn.Module, size: int):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    pred = SAM2ImagePredictor(model)
    pred._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    return pred


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(library model, .pt path, imported run dir)."""
    tmp = tmp_path_factory.mktemp("sam2")
    model = tiny_sam2()
    src = tmp / "sam2.1_tiny_test.pt"
    torch.save({"model": model.state_dict()}, src)
    run, fmt = import_model(src, tmp / "run", **TINY_OPTS)
    assert fmt == "sam2"
    return model, src, run


PROMPTS = [
    {"box": [20, 30, 90, 100]},
    {"point_coords": [[50, 60], [10, 12]], "point_labels": [1, 0]},
    {"box": [20, 30, 90, 100], "point_coords": [[50, 60]], "point_labels": [1]},
]


def _medfm_prompts(kw: dict):
    boxes = torch.tensor([kw["box"]], dtype=torch.float32) if "box" in kw else None
    pts = None
    if "point_coords" in kw:
        pts = (torch.tensor([kw["point_coords"]], dtype=torch.float32), torch.tensor([kw["point_labels"]]))
    return pts, boxes


def _np_prompts(kw: dict) -> dict:
    return {k: np.asarray(v) for k, v in kw.items()}


def parity(pred, net, image: np.ndarray, x: torch.Tensor) -> float:
    """Max abs diff of mask logits and IoU predictions over box / point / box+point prompts, multimask on and
    off, between the library's SAM2ImagePredictor and medfm's embed_image + decode."""
    pred.set_image(image)
    worst = 0.0
    with torch.no_grad():
        emb = net.embed_image(x)
        for kw in PROMPTS:
            for multi in (True, False):
                masks, iou, _ = pred.predict(multimask_output=multi, return_logits=True, **_np_prompts(kw))
                pts, boxes = _medfm_prompts(kw)
                logits, io = net.decode(emb, points=pts, boxes=boxes, multimask_output=multi)
                assert logits.shape[1:] == masks.shape
                worst = max(worst, float((logits[0] - torch.from_numpy(masks)).abs().max()),
                            float((io[0] - torch.from_numpy(iou)).abs().max()))
    return worst


def test_parity_grey_and_rgb(tiny):
    import medfm

    model, _, run = tiny
    net = medfm.load_run(run)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (S, S), dtype=np.uint8)
    diff_grey = parity(predictor(model, S), net, np.repeat(grey[..., None], 3, -1),
                       torch.from_numpy(grey).float()[None, None] / 255)
    rgb = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    x_rgb = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
    diff_rgb = parity(predictor(model, S), net, rgb, x_rgb)
    print(f"sam2 parity (tiny Hiera, {S} px): grey max abs diff {diff_grey:.3g}, RGB {diff_rgb:.3g}")
    assert diff_grey <= TOL and diff_rgb <= TOL


def test_several_boxes_through_medfm_prompt_code(tiny):
    """medfm's segment_with_prompts (embedding expanded per box) vs the predictor's batched boxes."""
    import medfm
    from medfm.tasks.segment.prompts import segment_with_prompts

    model, _, run = tiny
    net = medfm.load_run(run)
    grey = np.random.default_rng(1).integers(0, 256, (S, S), dtype=np.uint8)
    boxes = np.array([[10, 10, 60, 70], [50, 40, 120, 110]])
    pred = predictor(model, S)
    pred.set_image(np.repeat(grey[..., None], 3, -1))
    masks, iou, _ = pred.predict(box=boxes, multimask_output=True, return_logits=True)  # (2, 3, S, S)
    x = torch.from_numpy(grey).float()[None] / 255
    with torch.no_grad():
        emb = net.embed_image(x[None]).expand(2, -1, -1, -1)
        logits, io = net.decode(emb, boxes=torch.from_numpy(boxes).float())
    diff = max(float((logits - torch.from_numpy(masks)).abs().max()),
               float((io - torch.from_numpy(iou)).abs().max()))
    print(f"sam2 parity, 2 boxes batched: max abs diff {diff:.3g}")
    assert diff <= TOL
    best = torch.from_numpy(masks)[torch.arange(2), torch.from_numpy(iou).argmax(1)]
    union = segment_with_prompts(net, x, boxes=torch.from_numpy(boxes).float())
    assert torch.equal(union, (best > 0).any(0))


def test_medsam2_shaped_official_tiny_at_512(tmp_path):
    """The official SAM 2.1 Hiera-T config at 512 px (MedSAM2's), library-initialised random weights: size,
    heads and windows come from the official table, 512 px from the file name."""
    from sam2.build_sam import build_sam2

    import medfm

    torch.manual_seed(0)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu",
                       hydra_overrides_extra=["++model.image_size=512"])
    src = tmp_path / "MedSAM2_latest.pt"
    torch.save({"model": model.state_dict()}, src)
    assert detect_format(src) == "sam2"
    run, _ = import_model(src, tmp_path / "run")
    from medfm.rundir import RunDir

    conf = RunDir(run).config()
    assert conf["img_size"] == 512 and conf["model"]["trunk"]["global_att_blocks"] == [5, 7, 9]
    assert conf["inferred_from"]["size"] == "tiny"
    net = medfm.load_run(run)
    img = np.random.default_rng(2).integers(0, 256, (512, 512), dtype=np.uint8)
    pred = predictor(model, 512)
    pred.set_image(np.repeat(img[..., None], 3, -1))
    with torch.no_grad():
        emb = net.embed_image(torch.from_numpy(img).float()[None, None] / 255)
        masks, iou, _ = pred.predict(box=np.array([100, 120, 300, 360]), multimask_output=False,
                                     return_logits=True)
        logits, io = net.decode(emb, boxes=torch.tensor([[100.0, 120, 300, 360]]), multimask_output=False)
    diff = max(float((logits[0] - torch.from_numpy(masks)).abs().max()),
               float((io[0] - torch.from_numpy(iou)).abs().max()))
    print(f"sam2 parity (official Hiera-T, 512 px): max abs diff {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("config", ["sam2/sam2_hiera_t", "sam2.1/sam2.1_hiera_b+"])
def test_official_sizes_place_every_key(config):
    """SAM 2.0 and 2.1 official layouts (library-built, random init): every non-memory key placed."""
    from sam2.build_sam import build_sam2

    from medfm.models.seg.sam2 import is_memory_key, load_sam2_state

    sd = build_sam2(f"configs/{config}.yaml", None, device="cpu").state_dict()
    net, report = load_sam2_state(sd)
    assert report["keys_loaded"] == sum(not is_memory_key(k) for k in sd) == len(net.state_dict())
    assert report["keys_loaded"] + report["keys_skipped"] == len(sd)
    size = report["inferred_from"]["size"]
    assert size == ("tiny" if config.endswith("_t") else "base_plus")
    assert net.img_size == 1024 and net.embed_dim == 256 * 4


def test_skipped_memory_keys_reported_and_run_rebuilds(tiny, tmp_path):
    import json

    from safetensors import safe_open

    import medfm
    from medfm.models.seg.sam2 import is_memory_key

    model, src, run = tiny
    sd = model.state_dict()
    memory = [k for k in sd if is_memory_key(k)]
    video_only = ("memory_", "obj_ptr", "mask_downsample", "maskmem", "no_obj", "no_mem_pos")
    assert memory and all(k.startswith(video_only) for k in memory)
    conf = json.loads((run / "config.json").read_text())
    assert conf["kind"] == "promptable" and conf["imported"]["format"] == "sam2"
    assert conf["imported"]["keys_skipped"] == len(memory)
    assert conf["imported"]["keys_loaded"] + len(memory) == len(sd)
    assert "memory_attention" in conf["imported"]["skipped_modules"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["import"]["keys_skipped"] == len(memory)
    with safe_open(str(run / "seg_model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert stored == {k for k in sd if not is_memory_key(k)}
    assert "sam2" in (run / "README.md").read_text()
    assert conf["preprocessing"]["size"] == S and conf["preprocessing"]["resize_mode"] == "stretch"
    # the run rebuilds from config.json alone: move the source away
    moved = tmp_path / "elsewhere.pt"
    src.rename(moved)
    try:
        net = medfm.load_run(run)
        assert net.img_size == S and not any(is_memory_key(k) for k in net.state_dict())
    finally:
        moved.rename(src)


def test_safetensors_source_and_direct_file(tiny, tmp_path):
    from safetensors.torch import save_file

    from medfm.models.formats.sam2 import read_sam2_file

    model, src, run = tiny
    st = tmp_path / "sam2_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    assert detect_format(st) == "sam2"
    net, report = read_sam2_file(st, **TINY_OPTS)
    ref, _ = read_sam2_file(src, **TINY_OPTS)
    x = torch.rand(1, 1, S, S)
    with torch.no_grad():
        a = net.decode(net.embed_image(x), boxes=torch.tensor([[5.0, 5, 50, 60]]))[0]
        b = ref.decode(ref.embed_image(x), boxes=torch.tensor([[5.0, 5, 50, 60]]))[0]
    assert torch.equal(a, b) and report["keys_skipped"] > 0


def test_extra_key_is_not_dropped(tmp_path):
    sd = tiny_sam2().state_dict()
    sd["sam_mask_decoder.surprise.weight"] = torch.zeros(3)
    src = tmp_path / "extra.pt"
    torch.save({"model": sd}, src)
    with pytest.raises(InputError, match="surprise"):
        import_model(src, tmp_path / "run", **TINY_OPTS)


def test_custom_size_needs_options(tmp_path):
    src = tmp_path / "custom.pt"
    torch.save({"model": tiny_sam2().state_dict()}, src)
    with pytest.raises(ConfigError, match="not an official SAM 2 size"):
        import_model(src, tmp_path / "run", img_size=S)
    with pytest.raises(ConfigError, match="cannot use global attention"):
        import_model(src, tmp_path / "run2", **{**TINY_OPTS, "global_att_blocks": [3]})
    with pytest.raises(ConfigError, match="unknown SAM 2 option"):
        import_model(src, tmp_path / "run3", **TINY_OPTS, colour="blue")


def test_detection_does_not_claim_other_formats(tmp_path):
    from medfm.models.formats import sam2 as fmt

    sam1 = {"image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
            "prompt_encoder.no_mask_embed.weight": torch.zeros(1, 8),
            "mask_decoder.iou_token.weight": torch.zeros(1, 8)}
    torch.save(sam1, tmp_path / "sam_vit_b.pth")
    timm = {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}
    torch.save(timm, tmp_path / "resnet.pth")
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("sam_vit_b.pth", "resnet.pth", "notes.txt"):
        assert fmt.detect(tmp_path / name) is False
    assert fmt.detect(tmp_path) is False
    torch.save({"model": tiny_sam2().state_dict()}, tmp_path / "s.pt")
    assert fmt.detect(tmp_path / "s.pt") is True


def test_bad_files_give_input_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": tiny_sam2().state_dict()}, good)
    cut = tmp_path / "truncated.pt"
    cut.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(InputError, match="truncated.pt"):
        import_model(cut, tmp_path / "r1", format="sam2", **TINY_OPTS)
    junk = tmp_path / "garbage.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(InputError, match="garbage.safetensors"):
        import_model(junk, tmp_path / "r2", format="sam2")
    # a pickled non-weights object (a whole module): refused, never unpickled, with the re-save recipe
    bad = tmp_path / "pickled_model.pt"
    with open(bad, "wb") as f:
        pickle.dump({"model": torch.nn.Linear(2, 2)}, f)
    with pytest.raises(InputError, match="refused.*state_dict") as e:
        import_model(bad, tmp_path / "r3", format="sam2")
    assert "pickled_model.pt" in str(e.value) and "\n" not in str(e.value)
    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, other)
    with pytest.raises(InputError, match="not a SAM 2 checkpoint"):
        import_model(other, tmp_path / "r4", format="sam2")


def test_missing_sam2_package_is_one_config_error(monkeypatch):
    from medfm.models.seg.sam2 import Sam2Promptable, default_config

    monkeypatch.setitem(sys.modules, "sam2.modeling.backbones.hieradet", None)  # import now fails
    with pytest.raises(ConfigError, match="needs the sam2 package"):
        Sam2Promptable(default_config())


def test_official_table_matches_library_configs():
    """The heads / global blocks / windows medfm assumes per size are the library's own yaml values."""
    import inspect

    import sam2
    from omegaconf import OmegaConf
    from sam2.modeling.backbones.hieradet import Hiera

    from medfm.models.seg.sam2 import OFFICIAL_TRUNKS

    defaults = {k: v.default for k, v in inspect.signature(Hiera).parameters.items()}
    root = Path(sam2.__file__).parent / "configs"
    for tag, name in (("t", "tiny"), ("s", "small"), ("b+", "base_plus"), ("l", "large")):
        for cfg_file in (root / "sam2.1" / f"sam2.1_hiera_{tag}.yaml",
                         root / "sam2" / f"sam2_hiera_{tag}.yaml"):
            trunk = OmegaConf.to_container(OmegaConf.load(cfg_file).model.image_encoder.trunk)
            for field, want in OFFICIAL_TRUNKS[name].items():
                got = trunk.get(field, defaults[field])
                assert list(got) == list(want) if isinstance(want, list) else got == want, (cfg_file, field)
