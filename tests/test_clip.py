"""CLIP-style training: losses, gradient caching equals full-batch gradients, locking, run dir round trip."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from medfm.errors import ConfigError, InputError
from medfm.models.text import save_tiny_bert
from medfm.tasks.vlm.data import write_toy_pairs
from medfm.train.clip import (
    ClipConfig,
    build_clip,
    clip_loss,
    image_blocks,
    load_clip,
    same_text,
    sample_hard_negatives,
    train_clip,
    train_step,
)

TINY_VIT = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return str(write_toy_pairs(tmp_path_factory.mktemp("toy"), n=24, size=32))


def tiny_cfg(bert: str, **kw) -> ClipConfig:
    base = dict(
        text_tower=bert,
        img_size=32,
        encoder_kwargs=dict(TINY_VIT),
        lock_text=-1,
        fusion_dim=32,
        decoder_dim=32,
        batch_size=8,
        epochs=1,
        augment=False,
    )
    base.update(kw)
    return ClipConfig(**base)


def test_clip_loss_prefers_aligned_pairs():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    aligned = clip_loss(z, z, torch.tensor(50.0))
    shuffled = clip_loss(z, z[torch.randperm(6)], torch.tensor(50.0))
    assert aligned < 0.1 < shuffled
    # Symmetric: swapping the towers gives the same loss.
    w = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    assert torch.isclose(clip_loss(z, w, torch.tensor(10.0)), clip_loss(w, z, torch.tensor(10.0)))


def test_clip_loss_duplicate_texts_are_not_negatives():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    pos = same_text(["a", "a", "b", "c"])  # reports 0 and 1 are the same text
    assert pos[0, 1] and pos[1, 0] and not pos[0, 2]
    scale = torch.tensor(10.0)
    # Only the diagonal positive: plain InfoNCE.
    assert torch.isclose(
        clip_loss(img, txt, scale, torch.eye(4, dtype=torch.bool)), clip_loss(img, txt, scale)
    )
    # Duplicates: the target puts half the mass on each copy, in both directions.
    target = pos.float() / pos.float().sum(1, keepdim=True)
    logits = scale * img @ txt.t()
    want = 0.5 * (
        torch.nn.functional.cross_entropy(logits, target)
        + torch.nn.functional.cross_entropy(logits.t(), target)
    )
    assert torch.isclose(clip_loss(img, txt, scale, pos), want)
    assert not torch.isclose(clip_loss(img, txt, scale, pos), clip_loss(img, txt, scale))


def test_hard_negatives_skip_positives_and_favour_similar():
    sim = torch.tensor([[1.0, 0.9, -5.0], [0.9, 1.0, -5.0], [-5.0, -5.0, 1.0]])
    pos = torch.eye(3, dtype=torch.bool)
    torch.manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim * 5, pos) for _ in range(50)])
    assert (draws != torch.arange(3)).all()  # never the matching pair
    assert (draws[:, 0] == 1).float().mean() > 0.9  # the similar wrong report is the hard negative
    only_pos = torch.ones(2, 2, dtype=torch.bool)
    assert (sample_hard_negatives(torch.zeros(2, 2), only_pos) == -1).all()


def test_gradient_cache_equals_full_batch_gradients(bert):
    torch.manual_seed(0)
    cfg = tiny_cfg(bert, proj_norm="none")  # exact equality needs no batch statistics
    model = build_clip(cfg)
    model.train()
    images = torch.rand(8, 1, 32, 32)
    texts = [f"report {i % 5} with effusion" if i % 2 else f"normal study {i}" for i in range(8)]
    tok = model.text.tokenize(texts)

    def grads(chunk: int) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.cfg.grad_cache_chunk = chunk
        rec = train_step(model, images, texts, tok["input_ids"], tok["attention_mask"], None)
        assert math.isfinite(rec["loss"])
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, cached = grads(0), grads(3)
    assert set(full) == set(cached) and "logit_scale" in full and any(n.startswith("text.") for n in full)
    for n in full:
        torch.testing.assert_close(cached[n], full[n], rtol=1e-4, atol=1e-6, msg=n)


def test_cached_locked_text_blocks_give_same_gradients(bert):
    torch.manual_seed(0)
    model = build_clip(
        tiny_cfg(bert, lock_text=1, proj_norm="none")
    )  # block 0 locked: its outputs can be cached
    assert model.text_cache_layer == 1
    images = torch.rand(6, 1, 32, 32)
    texts = ["no effusion", "small effusion", "nodule", "normal", "no nodule", "effusion and nodule"]
    tok = model.text.tokenize(texts)
    hidden = model.text.hidden_at(tok["input_ids"], tok["attention_mask"], 1)

    def grads(h, chunk):
        model.zero_grad(set_to_none=True)
        model.cfg.grad_cache_chunk = chunk
        train_step(model, images, texts, tok["input_ids"], tok["attention_mask"], None, h)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, cached, both = grads(None, 0), grads(hidden, 0), grads(hidden, 4)
    assert any(n.startswith("text.model.encoder.layer.1.") for n in plain)
    for n in plain:
        torch.testing.assert_close(cached[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(both[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fully_locked_text_tower_caches_pooled_features(bert):
    """Whole text tower locked: one (N, D) feature per report is cached and gives the same gradients."""
    torch.manual_seed(0)
    model = build_clip(tiny_cfg(bert, lock_text=0, proj_norm="none", w_caption=0.5), ["no effusion nodule"])
    images = torch.rand(6, 1, 32, 32)
    texts = ["no effusion", "small effusion", "nodule", "normal", "no nodule", "effusion and nodule"]
    tok = model.text.tokenize(texts)
    cap = model.vocab.batch(texts, 16)
    pooled = model.text_cache(tok["input_ids"], tok["attention_mask"], batch_size=4)
    model.decoder.eval()  # no dropout: chunked and full-batch passes must see the same activations
    assert pooled.shape == (6, model.text.embed_dim)
    assert not any(p.requires_grad for p in model.text.parameters())

    def grads(h, chunk, c):
        model.zero_grad(set_to_none=True)
        model.cfg.grad_cache_chunk = chunk
        rec = train_step(model, images, texts, tok["input_ids"], tok["attention_mask"], c, h)
        return rec, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # Captioning is a per-chunk mean under gradient caching, so the chunked check is contrastive-only.
    for chunk, c in [(0, cap), (4, None)]:
        (r0, plain), (r1, cached) = grads(None, 0, c), grads(pooled, chunk, c)
        assert "txt_proj.weight" in plain and ("decoder.out.weight" in plain) == (c is not None)
        assert math.isclose(r0["loss"], r1["loss"], rel_tol=1e-5)
        for n in plain:
            torch.testing.assert_close(cached[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)
    # With an ITM head the token states are needed: the cache keeps them.
    itm = build_clip(tiny_cfg(bert, lock_text=0, w_itm=0.5))
    assert itm.text_cache(tok["input_ids"], tok["attention_mask"]).ndim == 3


def test_locking_keeps_only_last_blocks_trainable(bert):
    model = build_clip(tiny_cfg(bert, lock_image=1, lock_text=0))
    assert not any(p.requires_grad for p in model.text.parameters())
    blocks = image_blocks(model.encoder)
    assert all(p.requires_grad for p in blocks[-1].parameters())
    assert not any(p.requires_grad for p in blocks[0].parameters())
    assert not model.encoder.patch_embed.weight.requires_grad
    assert model.img_proj.weight.requires_grad  # heads always train


def test_3d_image_tower_trains(bert):
    cfg = tiny_cfg(bert, spatial_dims=3, img_size=16, encoder_kwargs={**TINY_VIT, "depth": 1}, w_itm=1.0)
    model = build_clip(cfg)
    texts = ["lesion present", "no lesion", "lesion present", "normal"]
    tok = model.text.tokenize(texts)
    rec = train_step(
        model, torch.rand(4, 1, 16, 16, 16), texts, tok["input_ids"], tok["attention_mask"], None
    )
    assert math.isfinite(rec["loss"]) and "itm" in rec
    assert model.encoder.patch_embed.weight.grad is not None


def test_train_writes_run_dir_and_reloads(bert, toy, tmp_path):
    cfg = tiny_cfg(
        bert, data=toy, out=str(tmp_path / "run"), w_itm=1.0, w_caption=1.0, epochs=2, grad_cache_chunk=4
    )
    run = train_clip(cfg, progress=False)
    for f in (
        "config.json",
        "model.safetensors",
        "heads.safetensors",
        "decoder.safetensors",
        "vocab.json",
        "metrics.json",
        "loss.png",
        "README.md",
        "text/model.safetensors",
        "text/config.json",
    ):
        assert (run / f).is_file(), f
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 4 and all(math.isfinite(h["loss"]) for h in m["history"])
    assert {"contrastive", "itm", "caption"} <= set(m["history"][0])
    # The image tower alone loads through the shared encoder I/O.
    from medfm.models.io import load_encoder

    assert load_encoder(run).embed_dim == 32
    model = load_clip(run)
    x = torch.rand(3, 1, 32, 32)
    e1, e2 = model.encode_images(x), load_clip(run).encode_images(x)
    torch.testing.assert_close(e1, e2)
    assert torch.allclose(e1.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert model.encode_texts(["no pleural effusion"]).shape == (1, cfg.proj_dim)
    reports = model.generate(x[:1], beam=2, max_len=12)
    assert isinstance(reports[0], str)
    p = model.match_scores(x[:2], ["a", "b"])
    assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all()


def test_time_budget_stops_training_early(bert, toy, tmp_path):
    """max_seconds ends training after the step that crosses it (at least one step), whatever epochs says;
    a fully locked text tower trains from the pooled-feature cache."""
    cfg = tiny_cfg(bert, data=toy, out=str(tmp_path / "run"), lock_text=0, epochs=50, max_seconds=1e-6)
    m = json.loads((train_clip(cfg, progress=False) / "metrics.json").read_text())
    assert m["steps"] == 1 and math.isfinite(m["history"][0]["loss"])


def test_bad_inputs_give_one_line_errors(bert, tmp_path):
    with pytest.raises(InputError, match="no such dataset"):
        train_clip(tiny_cfg(bert, data=str(tmp_path / "missing"), out=str(tmp_path / "r")))
    with pytest.raises(ConfigError):
        ClipConfig(w_contrastive=0, w_itm=0, w_caption=0)
    with pytest.raises(InputError, match="not a run directory"):
        load_clip(tmp_path)


def test_feature_norm_keeps_similar_images_apart(bert):
    """Near-identical X-rays give near-identical pooled vectors; batch-normalised features do not collapse."""
    torch.manual_seed(0)
    x = 0.5 + 0.02 * torch.rand(8, 1, 32, 32)

    def mean_cos(norm: str) -> float:
        torch.manual_seed(0)
        m = build_clip(tiny_cfg(bert, proj_norm=norm)).train()
        z, _ = m.embed_image(x)
        off = ~torch.eye(8, dtype=torch.bool)
        return float((z @ z.t())[off].mean())

    assert mean_cos("none") > 0.9 > 0.5 > mean_cos("batch")


def test_warm_start_from_a_clip_run_keeps_every_weight(bert, toy, tmp_path):
    """init_clip continues a finished run: the new model starts exactly where the old one ended (towers,
    projections, temperature, decoder + vocabulary), then trains on; incompatible heads give a ConfigError."""
    first = train_clip(tiny_cfg(bert, data=toy, out=str(tmp_path / "a"), w_caption=1.0), progress=False)
    old = load_clip(first)
    cfg = tiny_cfg(bert, data=toy, out=str(tmp_path / "b"), w_caption=1.0, init_clip=str(first))
    warm = build_clip(cfg).eval()
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(warm.encode_images(x), old.encode_images(x))
    torch.testing.assert_close(warm.encode_texts(["no effusion"]), old.encode_texts(["no effusion"]))
    assert warm.vocab.to_dict() == old.vocab.to_dict()
    for a, b in zip(warm.decoder.state_dict().values(), old.decoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    second = train_clip(cfg, progress=False)
    assert not torch.equal(load_clip(second).encode_images(x), old.encode_images(x))  # it trained on
    assert "Warm start" in (second / "README.md").read_text()
    with pytest.raises(ConfigError, match="cannot start from CLIP run"):
        build_clip(tiny_cfg(bert, proj_dim=16, init_clip=str(first)))


def test_time_budget_stop_then_resume_continues_the_run(bert, toy, tmp_path):
    """A run stopped by max_seconds keeps a resume state; resume=True takes it to the planned step count with
    the LR schedule where it was (the same LRs as an uninterrupted run), then drops the state."""
    cfg = tiny_cfg(bert, data=toy, out=str(tmp_path / "run"), lock_text=0, w_caption=1.0, epochs=3)
    full = json.loads((train_clip(replace(cfg, out=str(tmp_path / "full")), progress=False)
                       / "metrics.json").read_text())
    run = train_clip(replace(cfg, max_seconds=1e-6), progress=False)
    first = json.loads((run / "metrics.json").read_text())
    n = full["steps"]
    assert n > 2 and first["steps"] == 1 and first["stopped_early"] and first["total_steps"] == n
    assert (run / "resume" / "train_state.json").is_file() and "--resume" in (run / "README.md").read_text()
    done = json.loads((train_clip(replace(cfg, resume=True), progress=False) / "metrics.json").read_text())
    assert done["steps"] == n and not done["stopped_early"] and done["history"][0] == first["history"][0]
    assert [h["lr"] for h in done["history"]] == pytest.approx([h["lr"] for h in full["history"]])
    assert not (run / "resume").exists()
    with pytest.raises(InputError, match="nothing to resume"):
        train_clip(replace(cfg, resume=True), progress=False)


def test_checkpoint_every_saves_mid_run(bert, toy, tmp_path, monkeypatch):
    import medfm.train.clip_state as cs

    saved: list[int] = []
    real = cs.save_state
    monkeypatch.setattr(cs, "save_state", lambda out, sm, opt, g, prog: saved.append(prog["step"]) or real(
        out, sm, opt, g, prog))
    cfg = tiny_cfg(bert, data=toy, out=str(tmp_path / "run"), lock_text=0, epochs=3, checkpoint_every=2)
    m = json.loads((train_clip(cfg, progress=False) / "metrics.json").read_text())
    assert saved == list(range(2, m["steps"], 2)) and saved  # not after the last step: the run is complete
    assert not (tmp_path / "run" / "resume").exists()


def test_resume_state_round_trip(tmp_path):
    """Optimiser moments and both random streams come back exactly; a partial swap still leaves one state."""
    from medfm.train.clip_state import load_state, resume_dir, save_state

    w = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(w.parameters(), lr=1e-2)
    w(torch.randn(4, 3)).sum().backward()
    opt.step()
    g = torch.Generator().manual_seed(3)
    save_state(tmp_path, lambda d: d.mkdir(parents=True), opt, g, {"step": 5, "history": []})
    want_g, want_torch = torch.rand(2, generator=g), torch.rand(2)
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-2)
    g2 = torch.Generator()
    assert load_state(resume_dir(tmp_path), opt2, g2)["step"] == 5
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert torch.equal(torch.rand(2, generator=g2), want_g) and torch.equal(torch.rand(2), want_torch)
    (tmp_path / "resume").rename(tmp_path / ".resume.old")  # killed between the two renames
    assert resume_dir(tmp_path) == tmp_path / ".resume.old"
    with pytest.raises(InputError, match="does not fit"):
        load_state(resume_dir(tmp_path), torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]), g2)


def test_cli_gives_vit_defaults_only_to_encoders_that_take_them():
    """`medfm pretrain clip --encoder resnet18` must not hand a CNN ViT options (it used to, and failed)."""
    from medfm.models.registry import encoder_options
    from medfm.train.clip import small_encoder_defaults as _small_encoder_defaults

    assert {"patch_size", "depth"} <= encoder_options("vit_tiny") and "width" in encoder_options("resnet18")
    assert _small_encoder_defaults("vit_tiny", None, None) == {"patch_size": 8, "depth": 4}
    assert _small_encoder_defaults("vit_tiny", 16, None) == {"patch_size": 16, "depth": 4}
    assert _small_encoder_defaults("resnet18", None, None) == {}
    with pytest.raises(ConfigError, match="no option.*depth"):
        _small_encoder_defaults("resnet18", None, 3)
    with pytest.raises(ConfigError, match="Unknown encoder"):
        encoder_options("no_such_net")
