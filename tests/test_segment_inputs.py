"""Segmentation inference on raw files replays the run's preprocessing; smaller CLI defects (issue 16/17)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from badinputs import make_dicom, write_png
from medfm.data.prepare import PrepareConfig, prepare
from medfm.data.store import PreparedDataset


def _raw_folder(root: Path) -> None:
    """Two PNGs and a CT DICOM with disk masks, listed in a manifest (what a user gives `prepare`)."""
    rng = np.random.default_rng(0)
    root.mkdir()
    rows = ["image,mask"]
    for k, (h, w) in enumerate([(40, 40), (30, 50), (36, 40)]):
        yy, xx = np.mgrid[:h, :w]
        m = ((yy - h / 2) ** 2 + (xx - w / 2 - k) ** 2 < (h / 4) ** 2).astype(np.uint8) * 255
        write_png(root / f"m{k}.png", m)
        if k < 2:
            write_png(root / f"i{k}.png", (m * 0.6 + rng.integers(0, 60, (h, w))).astype(np.uint8))
            rows.append(f"i{k}.png,m{k}.png")
        else:
            make_dicom(
                root / "ct.dcm", (m.astype(np.int64) * 4 + rng.integers(0, 200, (h, w))), intercept=-1024.0
            )
            rows.append(f"ct.dcm,m{k}.png")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")


def test_raw_png_and_dicom_predict_like_their_prepared_cases(tmp_path):
    from medfm.tasks.segment.data import load_pairs
    from medfm.tasks.segment.infer import predict_logits
    from medfm.tasks.segment.runs import load_segmentation_run
    from medfm.tasks.segment.train import SegTrainConfig, train_segmentation

    raw, store = tmp_path / "raw", tmp_path / "store"
    _raw_folder(raw)
    cfg = PrepareConfig(size=48, keep_identifiers=True, salt_file=str(tmp_path / "salt"), fractions=(1, 0, 0))
    assert prepare(raw / "manifest.csv", store, cfg, progress=False)["n_skipped"] == 0
    train_cfg = SegTrainConfig(
        data=str(store),
        encoder="vit_tiny",
        encoder_kwargs={"depth": 1},
        img_size=32,
        steps=2,
        batch_size=2,
        progress=False,
    )
    run = train_segmentation(train_cfg, tmp_path / "run")
    model, conf = load_segmentation_run(run)
    assert conf["preprocessing"]["size"] == 48 and conf["kind"] == "segmenter"
    import medfm

    assert type(medfm.load_run(run)) is type(model)
    prepared = load_pairs(store, None, None, 32)
    ds = PreparedDataset(store)
    by_source = {Path(str(ds.manifest["source"][i])).name: i for i in range(len(ds))}
    # the same files as a raw manifest, read the way `segment predict / evaluate` read them for this run
    from medfm.tasks.segment.runs import preprocessing

    raw_pairs = load_pairs(raw / "manifest.csv", None, None, 32, spec=preprocessing(conf))
    assert len(raw_pairs) == len(prepared) == 3
    for j, src in enumerate(raw_pairs.sources):
        i = prepared.case_ids.index(ds.manifest["case_id"][by_source[Path(src).name]])
        assert torch.equal(raw_pairs.images[j], prepared.images[i]), src  # bit-identical input
        a = predict_logits(model, raw_pairs.images[j : j + 1])
        b = predict_logits(model, prepared.images[i : i + 1])
        assert torch.allclose(a, b, atol=1e-5), src
        assert torch.equal(raw_pairs.native_masks[j], prepared.native_masks[i]), src


def test_old_style_manifest_runs_still_predict_on_their_own_grid(tmp_path):
    """A run trained on a raw manifest records a stretch-resize spec; predictions map back to each input."""
    from medfm.tasks.segment.jobs import predict_run
    from medfm.tasks.segment.train import SegTrainConfig, train_segmentation

    raw = tmp_path / "raw"
    _raw_folder(raw)
    cfg = SegTrainConfig(
        data=str(raw),
        encoder="vit_tiny",
        encoder_kwargs={"depth": 1},
        img_size=32,
        steps=2,
        batch_size=2,
        train_split=None,
        progress=False,
    )
    run = train_segmentation(cfg, tmp_path / "run")
    assert predict_run(run, raw, tmp_path / "pred", split="all") == 3
    from PIL import Image

    assert np.asarray(Image.open(tmp_path / "pred" / "i1_mask.png")).shape == (30, 50)


def test_rgb_overlay_keeps_colour():
    from medfm.tasks.segment.io import overlay

    img = torch.zeros(3, 8, 8)
    img[0] = 1.0  # a red picture
    rgb = overlay(img, torch.zeros(8, 8, dtype=torch.long))
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == 255).all() and (rgb[..., 1:] == 0).all()
    grey = overlay(img[:1], torch.zeros(8, 8, dtype=torch.long))
    assert (grey[..., 0] == grey[..., 1]).all()


def test_train_progress_bar_counts_steps_not_epochs():
    from torch.utils.data import DataLoader

    from medfm.models.seg.registry import monai_unet
    from medfm.tasks.segment.data import CropDataset, SegPairs
    from medfm.train.segmentation import SegmentationModule, make_trainer

    imgs, masks = torch.rand(2, 1, 16, 16), (torch.rand(2, 16, 16) > 0.5).long()
    pairs = SegPairs(imgs, masks, list(masks), [(1.0, 1.0)] * 2, ["a", "b"])
    loader = DataLoader(CropDataset(pairs, (16, 16), length=6), batch_size=2)
    module = SegmentationModule(monai_unet(2, 1, 2, channels=(4, 8)), max_steps=3)
    trainer = make_trainer(3, progress=True)
    trainer.fit(module, loader)
    bar = trainer.progress_bar_callback.train_progress_bar  # Lightning's default said "Epoch 0/-2"
    assert bar.desc.startswith("train step") and "Epoch" not in bar.desc and "-" not in bar.desc
    assert bar.total == 3 and bar.n == 3


def test_prompt_cli_uses_the_library_thresholding(tmp_path):
    """`segment prompt` on a file = prompts.segment_with_prompts on the preprocessed image (one code path)."""
    from PIL import Image
    from typer.testing import CliRunner

    from medfm.cli.app import app
    from medfm.data.preprocess import load_input
    from medfm.models.registry import create_encoder
    from medfm.models.seg.sam import build_promptable
    from medfm.tasks.segment.prompts import segment_with_prompts
    from medfm.tasks.segment.runs import load_promptable, preprocessing, run_config, save_run

    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", img_size=[32, 32], patch_size=8, depth=1, embed_dim=32, num_heads=2)
    net = build_promptable(
        enc, 32, prompt_dim=32, decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32
    )
    run = save_run(net, "promptable", {"model": net.config, "img_size": 32}, tmp_path / "prun")
    img = np.zeros((32, 32), dtype=np.uint8)
    img[8:20, 6:18] = 180
    write_png(tmp_path / "x.png", img)
    out = tmp_path / "m.png"
    args = ["segment", "prompt", str(run), str(tmp_path / "x.png"), "--box", "6,8,17,19", "-o", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    got = np.asarray(Image.open(out)) > 0
    x = load_input(tmp_path / "x.png", preprocessing(run_config(run, "promptable")))
    box = torch.tensor([[6.0, 8, 17, 19]])
    want = segment_with_prompts(load_promptable(run), x, boxes=box, out_size=(32, 32))
    assert torch.from_numpy(got).equal(want) and want.any() != want.all()
    ov = np.asarray(Image.open(tmp_path / "m_overlay.png"))
    assert ov.shape == (32, 32, 3)
