"""One image input path: a raw PNG given to a CLIP run equals its prepared twin (embedding, zero-shot)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from badinputs import write_png
from medfm.data.pairs import ImageTextDataset, model_input
from medfm.data.prepare import PrepareConfig, prepare
from medfm.data.preprocess import make_spec, preprocessing_of
from medfm.models.clip import load_clip
from medfm.models.text import save_tiny_bert
from medfm.tasks.vlm.prompts import load_prompts
from medfm.tasks.vlm.zeroshot import evaluate_zeroshot
from medfm.train.clip import ClipConfig, train_clip


@pytest.fixture(scope="module")
def run_on_store(tmp_path_factory):
    """PNGs of different sizes + reports -> `prepare` (size 40) -> a tiny CLIP run at 32 px."""
    root = tmp_path_factory.mktemp("vlmin")
    rng = np.random.default_rng(0)
    raw = root / "raw"
    raw.mkdir()
    rows = []
    for i in range(8):
        h, w = (36, 52) if i % 2 else (60, 44)
        a = rng.integers(0, 120, (h, w)).astype(np.uint8)
        if i % 2:
            a[h * 3 // 4 :] += 120  # a bright band: "effusion"
        write_png(raw / f"c{i}.png", a)
        text = "Pleural effusion." if i % 2 else "No effusion."
        rows.append(f"{raw / f'c{i}.png'},{text},{i % 2},train")
    (raw / "m.csv").write_text("image,report,effusion,split\n" + "\n".join(rows) + "\n")
    store = root / "store"
    cfg = PrepareConfig(size=40, shard_size=4, keep_identifiers=True, salt_file=str(root / "salt"))
    s = prepare(raw / "m.csv", store, cfg, progress=False)
    assert s["n_skipped"] == 0, s["skipped"]
    bert = save_tiny_bert(root / "bert")
    ccfg = ClipConfig(
        data=str(store), out=str(root / "run"), text_tower="hf_local", text_path=str(bert), img_size=32,
        encoder_kwargs={"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}, batch_size=4,
        max_steps=2, augment=False,
    )
    return {"run": train_clip(ccfg, progress=False), "store": store}


def test_raw_png_equals_prepared_case(run_on_store):
    model = load_clip(run_on_store["run"])
    assert model.preprocessing == preprocessing_of(run_on_store["store"])
    assert model.preprocessing["size"] == 40  # recorded from the store, not the defaults
    ds = ImageTextDataset(run_on_store["store"], img_size=32)
    prepared = torch.stack([ds.image(i) for i in range(len(ds))])
    raw = torch.stack([model_input(src, model) for src in ds.prepared.manifest["source"]])
    assert raw.shape == prepared.shape == (8, 1, 32, 32)
    torch.testing.assert_close(raw, prepared, rtol=0, atol=1e-6)
    zp, zr = model.encode_images(prepared), model.encode_images(raw)
    torch.testing.assert_close(zr, zp, rtol=1e-4, atol=1e-5)
    prompts = load_prompts("default", ["effusion"])
    torch.testing.assert_close(
        torch.as_tensor(evaluate_zeroshot(model, raw, prompts)["probs"]),
        torch.as_tensor(evaluate_zeroshot(model, prepared, prompts)["probs"]), rtol=1e-4, atol=1e-5,
    )

def test_old_run_without_spec_uses_store_defaults_at_its_size(run_on_store, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(run_on_store["run"], old)
    conf = json.loads((old / "config.json").read_text())
    conf.pop("preprocessing")
    (old / "config.json").write_text(json.dumps(conf))
    model = load_clip(old)
    assert model.preprocessing is None
    from medfm.data.preprocess import load_input

    src = Path(ImageTextDataset(run_on_store["store"]).prepared.manifest["source"][0])
    want = load_input(src, make_spec(size=32, channels=1))
    torch.testing.assert_close(model_input(src, model), want)


def test_clip_run_written_by_old_main_still_loads():
    """A run dir written by the code before the split (fixture): loads, no spec recorded, encodes."""
    import medfm

    old = Path(__file__).parent / "fixtures" / "old_runs" / "clip"
    model = load_clip(old)
    assert type(medfm.load_run(old)) is type(model) and model.preprocessing is None
    z = model.encode_images(torch.rand(2, model.cfg.in_chans, model.cfg.img_size, model.cfg.img_size))
    assert z.shape == (2, model.cfg.proj_dim) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
