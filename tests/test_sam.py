"""Promptable (SAM-style) segmentation: prompt/mask decoders, prompt simulation, SAM checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from medfm.errors import InputError
from medfm.models.registry import create_encoder
from medfm.models.seg.sam import SAMImageEncoder, build_promptable, load_sam_checkpoint
from medfm.tasks.segment.prompts import box_from_mask, components, sample_points


def official_sam_shapes(
    dim=32,
    depth=4,
    heads=2,
    patch=8,
    grid=4,
    window=2,
    glob=(1, 3),
    pd=32,
    mlp=64,
    dec_depth=2,
    in_chans=3,
    mask_in=16,
    n_mask_tokens=4,
):
    """Key names and shapes of an official SAM checkpoint (segment_anything layout), at a reduced size.

    Written out from the published key layout (not from medfm's modules) so the test catches any key the
    converter would fail to place.
    """
    s: dict[str, tuple[int, ...]] = {
        "image_encoder.pos_embed": (1, grid, grid, dim),
        "image_encoder.patch_embed.proj.weight": (dim, in_chans, patch, patch),
        "image_encoder.patch_embed.proj.bias": (dim,),
        "image_encoder.neck.0.weight": (pd, dim, 1, 1),
        "image_encoder.neck.1.weight": (pd,),
        "image_encoder.neck.1.bias": (pd,),
        "image_encoder.neck.2.weight": (pd, pd, 3, 3),
        "image_encoder.neck.3.weight": (pd,),
        "image_encoder.neck.3.bias": (pd,),
    }
    hd = dim // heads
    for i in range(depth):
        b = f"image_encoder.blocks.{i}."
        r = grid if i in glob else window
        s.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.rel_pos_h": (2 * r - 1, hd),
                b + "attn.rel_pos_w": (2 * r - 1, hd),
                b + "attn.qkv.weight": (3 * dim, dim),
                b + "attn.qkv.bias": (3 * dim,),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.lin1.weight": (4 * dim, dim),
                b + "mlp.lin1.bias": (4 * dim,),
                b + "mlp.lin2.weight": (dim, 4 * dim),
                b + "mlp.lin2.bias": (dim,),
            }
        )
    p = "prompt_encoder."
    s[p + "pe_layer.positional_encoding_gaussian_matrix"] = (2, pd // 2)
    for i in range(4):
        s[p + f"point_embeddings.{i}.weight"] = (1, pd)
    s[p + "not_a_point_embed.weight"] = (1, pd)
    s[p + "no_mask_embed.weight"] = (1, pd)
    q = mask_in // 4
    s.update(
        {
            p + "mask_downscaling.0.weight": (q, 1, 2, 2),
            p + "mask_downscaling.0.bias": (q,),
            p + "mask_downscaling.1.weight": (q,),
            p + "mask_downscaling.1.bias": (q,),
            p + "mask_downscaling.3.weight": (mask_in, q, 2, 2),
            p + "mask_downscaling.3.bias": (mask_in,),
            p + "mask_downscaling.4.weight": (mask_in,),
            p + "mask_downscaling.4.bias": (mask_in,),
            p + "mask_downscaling.6.weight": (pd, mask_in, 1, 1),
            p + "mask_downscaling.6.bias": (pd,),
        }
    )

    def attn(prefix, inner):
        for n in ("q_proj", "k_proj", "v_proj"):
            s[f"{prefix}.{n}.weight"], s[f"{prefix}.{n}.bias"] = (inner, pd), (inner,)
        s[f"{prefix}.out_proj.weight"], s[f"{prefix}.out_proj.bias"] = (pd, inner), (pd,)

    m = "mask_decoder."
    for i in range(dec_depth):
        lay = f"{m}transformer.layers.{i}"
        attn(f"{lay}.self_attn", pd)
        attn(f"{lay}.cross_attn_token_to_image", pd // 2)
        attn(f"{lay}.cross_attn_image_to_token", pd // 2)
        for n in range(1, 5):
            s[f"{lay}.norm{n}.weight"], s[f"{lay}.norm{n}.bias"] = (pd,), (pd,)
        s.update(
            {
                f"{lay}.mlp.lin1.weight": (mlp, pd),
                f"{lay}.mlp.lin1.bias": (mlp,),
                f"{lay}.mlp.lin2.weight": (pd, mlp),
                f"{lay}.mlp.lin2.bias": (pd,),
            }
        )
    attn(f"{m}transformer.final_attn_token_to_image", pd // 2)
    s[f"{m}transformer.norm_final_attn.weight"], s[f"{m}transformer.norm_final_attn.bias"] = (pd,), (pd,)
    s[m + "iou_token.weight"], s[m + "mask_tokens.weight"] = (1, pd), (n_mask_tokens, pd)
    s.update(
        {
            m + "output_upscaling.0.weight": (pd, pd // 4, 2, 2),
            m + "output_upscaling.0.bias": (pd // 4,),
            m + "output_upscaling.1.weight": (pd // 4,),
            m + "output_upscaling.1.bias": (pd // 4,),
            m + "output_upscaling.3.weight": (pd // 4, pd // 8, 2, 2),
            m + "output_upscaling.3.bias": (pd // 8,),
        }
    )
    for t in range(n_mask_tokens):
        for j, (a, b) in enumerate([(pd, pd), (pd, pd), (pd, pd // 8)]):
            s[f"{m}output_hypernetworks_mlps.{t}.layers.{j}.weight"] = (b, a)
            s[f"{m}output_hypernetworks_mlps.{t}.layers.{j}.bias"] = (b,)
    for j, (a, b) in enumerate([(pd, 16), (16, 16), (16, n_mask_tokens)]):
        s[f"{m}iou_prediction_head.layers.{j}.weight"], s[f"{m}iou_prediction_head.layers.{j}.bias"] = (
            (b, a),
            (b,),
        )
    return s


def _random_state(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*v, generator=g) * 0.05 for k, v in shapes.items()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_official_layout_consuming_every_key(tmp_path, suffix):
    shapes = official_sam_shapes()
    sd = _random_state(shapes)
    path = tmp_path / f"sam_tiny{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    model, report = load_sam_checkpoint(path)
    assert report["keys_loaded"] == len(shapes) and report["keys_ignored"] == 0
    assert report["encoder"]["window_size"] == 2 and report["encoder"]["global_attn_indexes"] == (1, 3)
    assert report["encoder"]["num_heads"] == 2 and report["model"]["decoder_depth"] == 2
    own = model.state_dict()
    # every official tensor arrived unchanged at its mapped place
    assert torch.equal(own["encoder.blocks.1.attn.rel_pos_h"], sd["image_encoder.blocks.1.attn.rel_pos_h"])
    assert torch.equal(own["neck.2.weight"], sd["image_encoder.neck.2.weight"])
    assert torch.equal(own["mask_decoder.iou_token.weight"], sd["mask_decoder.iou_token.weight"])
    x = torch.rand(2, 1, 32, 32)  # grey input is repeated to the checkpoint's 3 channels
    masks, iou = model(x, boxes=torch.tensor([[4.0, 4.0, 20.0, 20.0], [0.0, 8.0, 31.0, 30.0]]))
    assert masks.shape == (2, 3, 32, 32) and iou.shape == (2, 3)
    one, _ = model(
        x,
        points=(torch.tensor([[[10.0, 12.0]]] * 2), torch.ones(2, 1, dtype=torch.long)),
        multimask_output=False,
    )
    assert one.shape == (2, 1, 32, 32) and torch.isfinite(one).all()


def test_unplaceable_key_is_an_error(tmp_path):
    sd = _random_state(official_sam_shapes())
    sd["image_encoder.extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(InputError, match="extra_head"):
        load_sam_checkpoint(path)
    del sd["image_encoder.extra_head.weight"]
    del sd["mask_decoder.iou_token.weight"]
    torch.save(sd, path)
    with pytest.raises(InputError, match="iou_token"):
        load_sam_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "junk.pth"
    p.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="junk.pth"):
        load_sam_checkpoint(p)


def test_windowed_attention_pads_non_multiple_grids():
    enc = SAMImageEncoder(
        img_size=40,
        patch_size=8,
        in_chans=1,
        embed_dim=16,
        depth=2,
        num_heads=2,
        window_size=3,
        global_attn_indexes=(1,),
    )
    feats = enc.forward_features(torch.rand(1, 1, 40, 40))
    assert len(feats) == 4 and feats[-1].shape == (1, 16, 5, 5)


def test_prompt_simulation():
    m = torch.zeros(40, 40, dtype=torch.long)
    m[5:15, 3:12] = 1
    m[20:30, 25:38] = 1
    comps = components(m)
    assert len(comps) == 2
    box = box_from_mask(comps[0], jitter=0.0)
    assert box.tolist() == [3.0, 5.0, 11.0, 14.0]  # x0, y0, x1, y1 inclusive pixel coords
    g = torch.Generator().manual_seed(0)
    jb = box_from_mask(comps[0], jitter=0.2, generator=g)
    assert (jb >= 0).all() and (jb <= 39).all() and not torch.equal(jb, box)
    pts, labels = sample_points(m, n_pos=3, n_neg=2, generator=g)
    assert pts.shape == (5, 2) and labels.tolist() == [1, 1, 1, 0, 0]
    for (x, y), lab in zip(pts.long().tolist(), labels.tolist()):
        assert int(m[y, x]) == lab


def test_promptable_learns_box_prompts():
    """A tiny promptable model on a tiny ViT learns to segment the boxed square (not the other one)."""
    from medfm.tasks.segment.prompts import train_promptable_steps

    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    model = build_promptable(
        enc, 32, prompt_dim=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32
    )
    g = torch.Generator().manual_seed(0)
    imgs, masks = [], []
    for _ in range(8):
        m = torch.zeros(32, 32, dtype=torch.long)
        for lab in (1, 2):
            y, x = torch.randint(0, 22, (2,), generator=g).tolist()
            m[y : y + 9, x : x + 9] = lab
        masks.append(m)
        imgs.append((m > 0).float()[None] * 0.7 + 0.1)
    images, masks = torch.stack(imgs), torch.stack(masks)
    hist = train_promptable_steps(model, images, masks, steps=60, batch_size=4, lr=3e-3, seed=0)
    assert hist[-1] < hist[0]
    from medfm.tasks.segment.prompts import evaluate_box_prompts

    res = evaluate_box_prompts(model, images, masks)
    assert res["dice"] > 0.6, res


def test_cli_prompt_with_sam_file_and_trained_run(tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from medfm.cli.app import app

    ckpt = tmp_path / "sam_tiny.pth"
    torch.save(_random_state(official_sam_shapes()), ckpt)
    img = np.zeros((48, 40), dtype=np.uint8)
    img[10:30, 8:24] = 200
    Image.fromarray(img).save(tmp_path / "x.png")
    out = tmp_path / "m.png"
    r = CliRunner().invoke(
        app,
        [
            "segment",
            "prompt",
            str(ckpt),
            str(tmp_path / "x.png"),
            "--box",
            "8,10,23,29",
            "--point",
            "15,20,1",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(out)).shape == (48, 40) and (tmp_path / "m_overlay.png").is_file()
    # train a tiny promptable run from a CSV dataset, then evaluate box prompts on it
    rows = ["image,mask,split"]
    for i in range(4):
        m = np.zeros((32, 32), dtype=np.uint8)
        m[4 + i : 14 + i, 6:16] = 255
        Image.fromarray(m).save(tmp_path / f"m{i}.png")
        Image.fromarray((m * 0.7).astype(np.uint8)).save(tmp_path / f"i{i}.png")
        rows.append(f"i{i}.png,m{i}.png,{'train' if i < 3 else 'test'}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "prun"
    r = CliRunner().invoke(
        app,
        [
            "segment",
            "prompt-train",
            str(tmp_path),
            "-o",
            str(run),
            "--img-size",
            "32",
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--prompt-dim",
            "32",
            "--encoder-depth",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["segment", "prompt", str(run), "--data", str(tmp_path)])
    assert r.exit_code == 0 and "box-prompt dice" in r.output, r.output
    r = CliRunner().invoke(app, ["segment", "prompt", str(run), str(tmp_path / "x.png")])
    assert r.exit_code != 0 and "--box" in str(r.exception)


def _official_to_hf(key: str) -> list[str]:
    """Official SAM key -> Hugging Face SamModel key(s): an independent implementation to compare against."""
    import re

    subs = [
        (r"^image_encoder\.patch_embed\.proj", "vision_encoder.patch_embed.projection"),
        (r"^image_encoder\.blocks\.(\d+)\.norm(\d)", r"vision_encoder.layers.\1.layer_norm\2"),
        (r"^image_encoder\.blocks\.", "vision_encoder.layers."),
        (r"^image_encoder\.neck\.0", "vision_encoder.neck.conv1"),
        (r"^image_encoder\.neck\.1", "vision_encoder.neck.layer_norm1"),
        (r"^image_encoder\.neck\.2", "vision_encoder.neck.conv2"),
        (r"^image_encoder\.neck\.3", "vision_encoder.neck.layer_norm2"),
        (r"^image_encoder\.", "vision_encoder."),
        (r"point_embeddings\.", "point_embed."),
        (r"mask_downscaling\.0", "mask_embed.conv1"),
        (r"mask_downscaling\.1", "mask_embed.layer_norm1"),
        (r"mask_downscaling\.3", "mask_embed.conv2"),
        (r"mask_downscaling\.4", "mask_embed.layer_norm2"),
        (r"mask_downscaling\.6", "mask_embed.conv3"),
        (r"transformer\.layers\.(\d+)\.norm(\d)", r"transformer.layers.\1.layer_norm\2"),
        (r"norm_final_attn", "layer_norm_final_attn"),
        (r"output_upscaling\.0", "upscale_conv1"),
        (r"output_upscaling\.1", "upscale_layer_norm"),
        (r"output_upscaling\.3", "upscale_conv2"),
        (r"(mlps\.\d+|iou_prediction_head)\.layers\.0\.", r"\1.proj_in."),
        (r"(mlps\.\d+|iou_prediction_head)\.layers\.1\.", r"\1.layers.0."),
        (r"(mlps\.\d+|iou_prediction_head)\.layers\.2\.", r"\1.proj_out."),
    ]
    if key == "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
        return [
            "prompt_encoder.shared_embedding.positional_embedding",
            "shared_image_embedding.positional_embedding",
        ]
    for a, b in subs:
        key = re.sub(a, b, key)
    return [key]


def test_matches_hugging_face_sam_numerically(tmp_path):
    """Same official weights in medfm's model and in transformers' SamModel give the same masks and IoU."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.sam.configuration_sam import (
        SamConfig,
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    sd = _random_state(official_sam_shapes(), seed=1)
    path = tmp_path / "sam.pth"
    torch.save(sd, path)
    ours, _ = load_sam_checkpoint(path, decoder_heads=2)
    vc = SamVisionConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        output_channels=32,
        window_size=2,
        global_attn_indexes=[1, 3],
        mlp_dim=128,
        num_pos_feats=16,
    )
    pc = SamPromptEncoderConfig(hidden_size=32, image_size=32, patch_size=8, mask_input_channels=16)
    mc = SamMaskDecoderConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_dim=64,
        iou_head_depth=3,
        iou_head_hidden_dim=16,
    )
    hf = transformers.SamModel(
        SamConfig(
            vision_config=vc.to_dict(), prompt_encoder_config=pc.to_dict(), mask_decoder_config=mc.to_dict()
        )
    ).eval()
    hf_sd = {h: v for k, v in sd.items() for h in _official_to_hf(k)}
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected and not [k for k in missing if "positional" not in k], (missing, unexpected)
    x = torch.rand(1, 1, 32, 32)
    boxes = torch.tensor([[3.0, 5.0, 20.0, 27.0]])
    mean = torch.tensor(ours.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(ours.pixel_std).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = ours.embed_image(x)
        sparse, dense = ours.prompt_encoder(boxes=boxes)
        low, iou = ours.mask_decoder(emb, ours.prompt_encoder.get_dense_pe(), sparse, dense)
        out = hf(pixel_values=(x.expand(-1, 3, -1, -1) - mean) / std, input_boxes=boxes[None])
    assert torch.allclose(hf.get_image_embeddings((x.expand(-1, 3, -1, -1) - mean) / std), emb, atol=1e-4)
    assert torch.allclose(out.pred_masks[0, 0], low[0], atol=1e-4)
    assert torch.allclose(out.iou_scores[0, 0], iou[0], atol=1e-4)
    # points only (a padding point is appended, as in the official model)
    pts, labs = torch.tensor([[[10.0, 12.0], [25.0, 4.0]]]), torch.tensor([[1, 0]])
    with torch.no_grad():
        sparse, dense = ours.prompt_encoder(points=(pts, labs))
        low, iou = ours.mask_decoder(emb, ours.prompt_encoder.get_dense_pe(), sparse, dense)
        out = hf(
            pixel_values=(x.expand(-1, 3, -1, -1) - mean) / std,
            input_points=pts[None],
            input_labels=labs[None],
        )
    assert torch.allclose(out.pred_masks[0, 0], low[0], atol=1e-4)
    assert torch.allclose(out.iou_scores[0, 0], iou[0], atol=1e-4)
