"""Text towers: the bundled MiniLM, local Hugging Face directories, locking, registry errors."""

from __future__ import annotations

import pytest
import torch

from medfm.errors import ConfigError, InputError
from medfm.models.text import TEXT_TOWERS, create_text_tower, lock_tower, mean_pool, save_tiny_bert


def test_minilm_embeds_similar_sentences_closer():
    tower = create_text_tower("minilm")
    assert tower.embed_dim == 384 and tower.config["name"] == "minilm"
    e = tower.encode(
        [
            "Small left pleural effusion.",
            "There is a small pleural effusion on the left side.",
            "The cardiac silhouette is enlarged.",
            "Normal bones, no fracture.",
        ]
    )
    assert torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    sim = e @ e.t()
    assert sim[0, 1] > 0.7
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 3] + 0.2


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    m = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(h, m), torch.tensor([[2.0, 2.0]]))


def test_local_directory_tower_save_reload_and_lock(tmp_path):
    path = save_tiny_bert(tmp_path / "bert", hidden=32, layers=3)
    tower = create_text_tower(str(path))  # a directory name works directly
    assert tower.embed_dim == 32 and len(tower.layers()) == 3
    tok = tower.tokenize(["no pneumothorax", "a much longer report about a pleural effusion"])
    assert (
        tok["input_ids"].shape == tok["attention_mask"].shape
        and tok["attention_mask"][0].sum() < tok["attention_mask"][1].sum()
    )
    e = tower.encode(["no pneumothorax"])
    tower.save(tmp_path / "copy")
    again = create_text_tower("hf_local", path=str(tmp_path / "copy"))
    torch.testing.assert_close(again.encode(["no pneumothorax"]), e)
    # Cached states of the locked lower blocks + the upper blocks == the full forward.
    tower.eval()
    full = tower.forward_tokens(tok["input_ids"], tok["attention_mask"])
    split = tower.forward_from(
        tower.hidden_at(tok["input_ids"], tok["attention_mask"], 2), tok["attention_mask"], 2
    )
    valid = tok["attention_mask"].bool()
    torch.testing.assert_close(split[valid], full[valid], rtol=1e-5, atol=1e-5)
    lock_tower(tower, tower.layers(), unlocked_layers=1)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable and all(".layer.2." in n for n in trainable)
    lock_tower(tower, tower.layers(), unlocked_layers=0)
    assert not any(p.requires_grad for p in tower.parameters())


def test_registry_and_errors(tmp_path):
    assert {"minilm", "hf_local"} <= set(TEXT_TOWERS.names())
    with pytest.raises(ConfigError, match="Unknown text tower"):
        create_text_tower("no_such_tower")
    with pytest.raises(ConfigError, match="needs path"):
        create_text_tower("hf_local")
    with pytest.raises(InputError, match="no config.json"):
        create_text_tower("hf_local", path=str(tmp_path))
