"""In-context segmentation: task embedding from references, no weight change at inference, held-out labels."""

from __future__ import annotations

import torch

from medfm.models.registry import create_encoder
from medfm.models.seg.incontext import IncontextSegmenter
from medfm.tasks.segment.incontext import evaluate_incontext, sample_episodes, train_incontext


def shapes_dataset(n=24, size=32, seed=0):
    """Images with three structures (labels 1..3), each with its own texture/intensity, at random places."""
    g = torch.Generator().manual_seed(seed)
    imgs, masks = [], []
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(n):
        m = torch.zeros(size, size, dtype=torch.long)
        img = 0.05 * torch.rand(size, size, generator=g)
        for lab, level in ((1, 0.35), (2, 0.6), (3, 0.9)):
            r = int(torch.randint(3, 6, (1,), generator=g))
            cy, cx = torch.randint(r, size - r, (2,), generator=g).tolist()
            region = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r) & (m == 0)
            m[region] = lab
            img[region] = level
        imgs.append(img[None])
        masks.append(m)
    return torch.stack(imgs), torch.stack(masks)


def tiny_model():
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    return IncontextSegmenter(enc, dim=16, feature_size=8)


def test_episodes_have_the_sampled_structure():
    images, masks = shapes_dataset(8)
    q, qm, r, rm = sample_episodes(
        images, masks, [2], k=3, n=4, rng=__import__("numpy").random.default_rng(0)
    )
    assert q.shape == (4, 1, 32, 32) and r.shape == (4, 3, 1, 32, 32) and rm.shape == (4, 3, 32, 32)
    assert set(qm.unique().tolist()) == {0, 1} and bool((rm.flatten(2).sum(-1) > 0).all())
    # the query mask is exactly the pixels of label 2 in some image of the set
    assert any(torch.equal(qm[0], (m == 2).long()) for m in masks)


def test_inference_is_gradient_free_and_order_invariant():
    model = tiny_model().eval()
    images, masks = shapes_dataset(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refs, rmask = images[1:4][None], (masks[1:4] == 1).long()[None]
    a = model(images[:1], refs, rmask)
    b = model(images[:1], refs.flip(1), rmask.flip(1))
    assert torch.allclose(a, b, atol=1e-5)  # prototypes pool over references
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert a.shape == (1, 2, 32, 32)


def test_episodic_training_learns_and_output_follows_references():
    """Episodic training lowers the loss, and the prediction for one query changes with the references.

    (Generalisation to held-out structures needs far more episodes than a unit test affords; it is measured
    by the benchmark, not asserted here.)
    """
    images, masks = shapes_dataset(24)
    model = tiny_model()
    hist = train_incontext(
        model, images[:16], masks[:16], labels=[1, 3], steps=40, batch_size=8, lr=3e-3, encoder_lr_scale=1.0
    )
    assert sum(hist[-10:]) < sum(hist[:10])
    with torch.no_grad():
        refs = images[:5][None]
        a = model(images[16:17], refs, (masks[:5] == 1).long()[None])
        b = model(images[16:17], refs, (masks[:5] == 3).long()[None])
    assert (a.argmax(1) != b.argmax(1)).float().mean() > 0.01
    res = evaluate_incontext(
        model, images[16:], masks[16:], labels=[2], k=1, ref_images=images[:16], ref_masks=masks[:16]
    )
    assert 0.0 <= res["label_2"] <= 1.0 and set(res) == {"label_2", "mean"}


def test_cli_incontext_train_then_evaluate_held_out(tmp_path):
    import json

    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from medfm.cli.app import app

    images, masks = shapes_dataset(10)
    rows = ["image,mask,split"]
    for i in range(10):
        Image.fromarray((images[i, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / f"i{i}.png")
        Image.fromarray(masks[i].numpy().astype(np.uint8)).save(tmp_path / f"m{i}.png")
        rows.append(f"i{i}.png,m{i}.png,{'train' if i < 7 else 'test'}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "ic"
    r = CliRunner().invoke(
        app,
        [
            "segment",
            "incontext",
            str(tmp_path),
            "-o",
            str(run),
            "--train-labels",
            "1,3",
            "--test-labels",
            "2",
            "--img-size",
            "32",
            "--steps",
            "2",
            "--encoder-depth",
            "2",
            "--patch-size",
            "8",
            "--embed-dim",
            "32",
            "--num-heads",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    enc = json.loads((run / "config.json").read_text())["encoder"]  # architecture sizes set from the CLI
    assert (enc["patch_size"], enc["embed_dim"], enc["depth"]) == (8, 32, 2)
    import medfm

    assert type(medfm.load_run(run)).__name__ == "IncontextSegmenter"
    res = json.loads((run / "metrics.json").read_text())["incontext_eval"]
    assert set(res) == {"k1", "k5"} and 0.0 <= res["k5"]["label_2"] <= 1.0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    r = CliRunner().invoke(
        app,
        [
            "segment",
            "incontext",
            str(tmp_path),
            "--run",
            str(run),
            "-o",
            str(tmp_path / "ic_eval"),
            "--test-labels",
            "2",
            "--k",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output  # reload the run: evaluation only, no training
    ev = json.loads((tmp_path / "ic_eval" / "metrics.json").read_text())["incontext_eval"]
    assert set(ev) == {"k1"} and 0.0 <= ev["k1"]["label_2"] <= 1.0
    # the evaluated run is only read (issue 16, item 15)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_knn_prior_reads_the_reference_masks():
    """Untrained kNN path: the propagated map follows the references' masks (with the query as its own
    reference, positions inside the mask score positive, outside negative) and ignores reference order."""
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    model = IncontextSegmenter(enc, dim=16, feature_size=8, prior="knn").eval()
    images, masks = shapes_dataset(6)
    with torch.no_grad():
        refs, rmask = images[1:4][None], (masks[1:4] == 3).long()[None]
        a = model(images[:1], refs, rmask)
        b = model(images[:1], refs.flip(1), rmask.flip(1))
        assert torch.allclose(a, b, atol=1e-5) and a.shape == (1, 2, 32, 32)
        model.knn_log_temp.fill_(-6.0)  # sharp attention: nearest reference position wins
        half = torch.zeros(1, 1, 32, 32, dtype=torch.long)
        half[..., :16] = 1  # aligned with the 8-px token grid: whole cells in / out
        task = model.task_embedding(images[:1][None], half)
        knn = model.knn_map(model._features(images[:1])[-1], task)[0, 0]
        cover = task.ref_masks[0].view_as(knn)
    inside, outside = knn[cover > 0.99], knn[cover < 0.01]
    assert inside.numel() and outside.numel()
    assert (inside > 0).float().mean() >= 0.9 and (outside < 0).float().mean() >= 0.9
    import pytest

    with pytest.raises(ValueError, match="prior"):
        IncontextSegmenter(enc, prior="nope")
