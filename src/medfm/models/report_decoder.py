"""A small transformer decoder that writes reports, conditioned on visual tokens through cross-attention.

Tokenizer: a word-level vocabulary built from the training reports. At the scale medfm trains decoders from
scratch (hundreds to a few thousand reports) a closed word vocabulary of a few hundred entries learns much
faster than a 30k word-piece one, and every generated token is a real word. Words seen fewer than
``min_count`` times map to <unk>.

With no visual memory (``memory=None``) the decoder is a plain language model over reports (a learned
"null" memory token stands in), which is how text-only training and perplexity are measured.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|[^\sa-z0-9]")
_SECTION = re.compile(r"\b(findings|impression)\s*:", re.I)


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks."""
    return _WORD.findall((text or "").lower())


class WordVocab:
    """Word <-> id mapping with pad/bos/eos/unk; JSON-serialisable (``to_dict``/``from_dict``)."""

    def __init__(self, itos: list[str]) -> None:
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.bos, self.eos, self.unk = (self.stoi[t] for t in (PAD, BOS, EOS, UNK))

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1, max_size: int = 5000) -> WordVocab:
        c = Counter(w for t in texts for w in words(t))
        kept = [w for w, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
        return cls([PAD, BOS, EOS, UNK, *kept[:max_size]])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, max_len: int) -> list[int]:
        """<bos> words <eos>, truncated to max_len ids (the <eos> is kept)."""
        ids = [self.stoi.get(w, self.unk) for w in words(text)][: max_len - 2]
        return [self.bos, *ids, self.eos]

    def batch(self, texts: list[str], max_len: int) -> torch.Tensor:
        seqs = [self.encode(t, max_len) for t in texts]
        out = torch.full((len(seqs), max(len(s) for s in seqs)), self.pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        toks = []
        for i in ids:
            i = int(i)
            if i == self.eos:
                break
            if i in (self.pad, self.bos):
                continue
            toks.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return detokenize(toks)

    def to_dict(self) -> dict[str, Any]:
        return {"itos": self.itos}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordVocab:
        return cls(d["itos"])


def detokenize(toks: list[str]) -> str:
    """Words back to readable text: punctuation attached, sentences capitalised, section names upper-case."""
    s = " ".join(toks)
    s = re.sub(r"\s+([.,;:!?)])", r"\1", s)
    s = re.sub(r"([(])\s+", r"\1", s)
    s = _SECTION.sub(lambda m: m.group(1).upper() + ":", s)
    s = re.sub(r"(^|[.!?:]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), s)
    return s.strip()


class ReportDecoder(nn.Module):
    """Causal transformer decoder; cross-attends to ``memory`` (B, N, memory_dim) visual tokens."""

    def __init__(
        self,
        vocab_size: int,
        memory_dim: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        max_len: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.max_len = int(max_len)
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.max_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.mem_in = nn.Linear(memory_dim, dim)
        self.null_memory = nn.Parameter(torch.zeros(1, 1, dim))  # for text-only language modelling
        layer = nn.TransformerDecoderLayer(
            dim, heads, dim * 4, dropout=dropout, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerDecoder(layer, depth)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab_size)

    def _memory(self, memory: torch.Tensor | None, b: int) -> torch.Tensor:
        if memory is None:
            return self.null_memory.expand(b, -1, -1)
        return self.mem_in(memory)

    def forward(
        self,
        tokens: torch.Tensor,
        memory: torch.Tensor | None,
        pad_id: int | None = None,
        mem: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, L, vocab) for input tokens (B, L). ``mem`` = already projected memory."""
        b, n = tokens.shape
        if n > self.max_len:
            raise ValueError(f"sequence of {n} tokens exceeds decoder max_len {self.max_len}")
        x = self.tok(tokens) + self.pos[:, :n]
        causal = torch.triu(torch.full((n, n), float("-inf"), device=tokens.device), diagonal=1)
        # Float masks for both (a bool padding mask next to a float causal mask is deprecated in torch).
        pad = None
        if pad_id is not None:
            pad = torch.zeros(b, n, device=tokens.device).masked_fill(tokens == pad_id, float("-inf"))
        m = mem if mem is not None else self._memory(memory, b)
        h = self.layers(x, m, tgt_mask=causal, tgt_key_padding_mask=pad)
        return self.out(self.norm(h))

    def token_nll(
        self, tokens: torch.Tensor, memory: torch.Tensor | None, pad_id: int
    ) -> tuple[torch.Tensor, int]:
        """Summed next-token negative log-likelihood over non-pad targets, and the number of targets."""
        logits = self(tokens[:, :-1], memory, pad_id)
        tgt = tokens[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=pad_id, reduction="sum"
        )
        return nll, int((tgt != pad_id).sum())

    def loss(self, tokens: torch.Tensor, memory: torch.Tensor | None, pad_id: int) -> torch.Tensor:
        """Mean next-token cross-entropy (teacher forcing)."""
        nll, n = self.token_nll(tokens, memory, pad_id)
        return nll / max(n, 1)

    @torch.no_grad()
    def generate(
        self,
        memory: torch.Tensor | None,
        bos: int,
        eos: int,
        max_len: int | None = None,
        beam: int = 1,
        batch: int = 1,
        length_penalty: float = 1.0,
    ) -> list[list[int]]:
        """Greedy (beam=1) or beam-search decoding; one id list per memory row (without <bos>)."""
        max_len = min(max_len or self.max_len, self.max_len)
        b = memory.shape[0] if memory is not None else batch
        mem = self._memory(memory, b)
        if beam <= 1:
            seq = torch.full((b, 1), bos, dtype=torch.long, device=mem.device)
            done = torch.zeros(b, dtype=torch.bool, device=mem.device)
            for _ in range(max_len - 1):
                nxt = self(seq, None, mem=mem)[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                seq = torch.cat([seq, nxt[:, None]], 1)
                done |= nxt == eos
                if bool(done.all()):
                    break
            return [_until_eos(s[1:].tolist(), eos) for s in seq]
        return [self._beam(mem[i : i + 1], bos, eos, max_len, beam, length_penalty) for i in range(b)]

    def _beam(self, mem: torch.Tensor, bos: int, eos: int, max_len: int, k: int, alpha: float) -> list[int]:
        beams: list[tuple[float, list[int]]] = [(0.0, [bos])]
        finished: list[tuple[float, list[int]]] = []
        for _ in range(max_len - 1):
            seqs = torch.tensor([s for _, s in beams], device=mem.device)
            logp = self(seqs, None, mem=mem.expand(len(beams), -1, -1))[:, -1].log_softmax(-1)
            cand = []
            for (score, s), lp in zip(beams, logp):
                top = lp.topk(k)
                cand += [(score + float(v), s + [int(t)]) for v, t in zip(top.values, top.indices)]
            cand.sort(key=lambda c: -c[0])
            beams = []
            for score, s in cand:
                if s[-1] == eos:
                    finished.append((score / (len(s) - 1) ** alpha, s))
                elif len(beams) < k:
                    beams.append((score, s))
                if len(beams) == k:
                    break
            if not beams or (
                len(finished) >= k
                and max(f[0] for f in finished) >= max(sc / (len(s) - 1) ** alpha for sc, s in beams)
            ):
                break
        finished += [(sc / max(len(s) - 1, 1) ** alpha, s) for sc, s in beams]
        best = max(finished, key=lambda f: f[0])[1]
        return _until_eos(best[1:], eos)


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def perplexity(nll_sum: float, n_tokens: int) -> float:
    return float(math.exp(nll_sum / max(n_tokens, 1)))
