"""Reports as bags of sentences: splitting, pooling with dropout, and CLIP training with sentence pooling."""

from __future__ import annotations

import json
import math

import pytest
import torch

from medfm.errors import ConfigError
from medfm.models.sentences import pool_sentences, sentence_index, split_sentences


def test_split_drops_headers_and_list_numbers_but_keeps_decimals():
    text = "FINDINGS: The lungs are clear. A 3.5 cm mass; no effusion.\nIMPRESSION: 1. Mass. 2. No effusion."
    assert split_sentences(text) == [
        "The lungs are clear.",
        "A 3.5 cm mass.",
        "no effusion.",
        "Mass.",
        "No effusion.",
    ]
    assert split_sentences("normal") == ["normal."]
    assert split_sentences("") == [""]


def test_sentence_index_shares_repeated_sentences():
    sents, index = sentence_index(["No effusion. Heart size is normal.", "Heart size is normal."])
    assert sents == ["No effusion.", "Heart size is normal."]
    assert index.tolist() == [[0, 1], [1, -1]]


def test_pool_is_the_mean_over_kept_sentences():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    index = torch.tensor([[0, 1, -1], [2, -1, -1]])
    torch.testing.assert_close(pool_sentences(feats, index), torch.tensor([[0.5, 0.5], [3.0, 3.0]]))
    # with dropout every row still keeps a sentence, and the result is a mean of a subset of its rows
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = pool_sentences(feats, index, drop=0.9, generator=g)
        assert out[1].tolist() == [3.0, 3.0]
        assert out[0].tolist() in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5])


def test_clip_with_sentence_pooling_trains_and_embeds_like_its_sentences(tmp_path):
    from medfm.models.text import save_tiny_bert
    from medfm.tasks.vlm.data import write_toy_pairs
    from medfm.train.clip import ClipConfig, load_clip, train_clip

    bert = str(save_tiny_bert(tmp_path / "bert"))
    toy = str(write_toy_pairs(tmp_path / "toy", n=16, size=32))
    kw = dict(text_tower=bert, img_size=32, batch_size=8, epochs=2, lock_text=0, text_pooling="sentences")
    kw["encoder_kwargs"] = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    run = train_clip(ClipConfig(data=toy, out=str(tmp_path / "run"), **kw), progress=False)
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 2 and all(math.isfinite(h["loss"]) for h in m["history"])
    model = load_clip(run)
    assert model.cfg.text_pooling == "sentences"
    # a two-sentence report embeds as the (normalised) mean of its sentences before projection
    two = model.encode_texts(["No effusion. Heart is large."])
    feats = model.sentence_features(["No effusion.", "Heart is large."]).mean(0, keepdim=True)
    expect = torch.nn.functional.normalize(model.txt_proj(model.txt_norm(feats)), dim=-1).detach()
    torch.testing.assert_close(two, expect, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="lock_text=0"):
        ClipConfig(text_pooling="sentences", lock_text=2)
