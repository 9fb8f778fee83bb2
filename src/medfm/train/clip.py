"""CLIP-style image-report pretraining: any medfm image encoder + a text tower, trained with a weighted sum of

- symmetric InfoNCE with a learnable, clamped temperature (CLIP);
- image-text matching (ITM) on hard negatives sampled from the contrastive similarities, scored by a small
  cross-attention fusion module (ALBEF/BLIP);
- report generation: next-token loss of a small decoder that cross-attends to the visual tokens (CoCa-like).

Either tower can be locked fully or all but its last N blocks (LiT-style locked image tuning). Large effective
batches fit small memory through gradient caching (train/gradcache.py). The run directory holds
``model.safetensors`` (the image tower alone, loadable by every medfm command), ``text/`` (Hugging Face
format), ``heads.safetensors`` (projections, temperature, ITM fusion), ``decoder.safetensors`` +
``vocab.json``,
``config.json``, ``metrics.json``, ``loss.png`` and a ``README.md`` model card.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from medfm.errors import ConfigError, InputError
from medfm.models.fusion import ITMFusion
from medfm.models.report_decoder import ReportDecoder, WordVocab
from medfm.models.sentences import pool_sentences, sentence_index
from medfm.models.text import TextTower, create_text_tower, lock_tower, mean_pool
from medfm.runs import environment, read_json, write_json
from medfm.train import clip_state
from medfm.train.gradcache import cached_backward


@dataclass
class ClipConfig:
    """Settings of a CLIP-style run; saved verbatim in config.json (architectures as data)."""

    data: str = ""
    split: str | None = "train"
    out: str = ""
    # image tower: a registry name built from scratch, or a run directory / checkpoint to start from
    encoder: str = "vit_tiny"
    init_from: str | None = None
    # a CLIP run directory to start *every* weight from (both towers, heads, decoder and its vocabulary):
    # a warm start with a fresh optimiser and LR schedule, for training a finished run longer. The
    # architecture then comes from that run; encoder/init_from/encoder_kwargs are ignored.
    init_clip: str | None = None
    spatial_dims: int = 2
    in_chans: int = 1
    img_size: int = 64
    encoder_kwargs: dict[str, Any] = field(default_factory=lambda: {"patch_size": 8, "depth": 4})
    # text tower: registry name (minilm, hf_local) or a local Hugging Face directory
    text_tower: str = "minilm"
    text_path: str | None = None
    max_text_len: int = 96
    # "report": one embedding of the whole report; "sentences": the mean of per-sentence embeddings (matches
    # single-sentence zero-shot prompts; needs the text tower locked, lock_text=0), with each sentence
    # dropped with probability sentence_dropout during training (text augmentation)
    text_pooling: str = "report"
    sentence_dropout: float = 0.3
    # locking: -1 = train all, 0 = lock the whole tower, N = train only its last N blocks
    lock_image: int = -1
    lock_text: int = 2
    proj_dim: int = 128
    # "batch": batch-normalise pooled image features before the projection (no affine). Scratch ViTs give
    # near-identical pooled vectors for similar-looking X-rays (cosine ~0.999 at init), which stalls InfoNCE;
    # centring across the batch removes the shared component. "none": plain linear projection (and exact
    # gradient caching — with "batch" each chunk is normalised with its own statistics).
    proj_norm: str = "batch"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    # objective weights (0 disables an objective and its module)
    w_contrastive: float = 1.0
    w_itm: float = 0.0
    w_caption: float = 0.0
    fusion_dim: int = 128
    fusion_depth: int = 1
    decoder_dim: int = 128
    decoder_depth: int = 2
    max_report_len: int = 80
    vocab_min_count: int = 1
    # optimisation
    epochs: int = 10
    max_steps: int = 0  # > 0 stops early
    max_seconds: float = 0.0  # > 0: stop after this much training wall time (CPU budgets); schedule unchanged
    # resumable training: a run stopped by max_seconds, and every checkpoint_every steps (> 0), keeps its
    # optimiser, schedule position and random streams in OUT/resume; resume=True continues from there
    checkpoint_every: int = 0
    resume: bool = False
    batch_size: int = 64
    grad_cache_chunk: int = 0  # > 0: embed in chunks of this size with gradient caching
    lr: float = 5e-4
    text_lr: float = 5e-5
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    augment: bool = True
    seed: int = 0
    threads: int = 0  # 0: leave torch's default
    workers: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if (
            min(self.w_contrastive, self.w_itm, self.w_caption) < 0
            or self.w_contrastive + self.w_itm + self.w_caption <= 0
        ):
            raise ConfigError("objective weights must be >= 0 and not all 0")
        if self.proj_norm not in ("batch", "none"):
            raise ConfigError(f"proj_norm must be 'batch' or 'none', got {self.proj_norm!r}")
        if self.text_pooling not in ("report", "sentences"):
            raise ConfigError(f"text_pooling must be 'report' or 'sentences', got {self.text_pooling!r}")
        if self.text_pooling == "sentences" and (self.lock_text != 0 or self.w_itm > 0):
            raise ConfigError(
                "text_pooling='sentences' needs a locked text tower (lock_text=0) and no ITM head (w_itm=0)"
            )
        if not 0 <= self.sentence_dropout < 1:
            raise ConfigError(f"sentence_dropout must be in [0, 1), got {self.sentence_dropout}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 for a contrastive loss, got {self.batch_size}")
        if self.w_itm > 0 and self.w_contrastive <= 0:
            raise ConfigError(
                "ITM samples hard negatives from the contrastive similarities: set w_contrastive > 0"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---- losses (pure functions) ---------------------------------------------------------------------------
def clip_loss(
    img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised embeddings (B, D); ``logit_scale`` is exp(1/temperature).

    ``positives`` (B, B) bool marks extra positive pairs (e.g. identical report texts, which are not
    negatives of each other); targets are then spread uniformly over a row's positives.
    """
    logits = logit_scale * img @ txt.t()
    if positives is None:
        tgt = torch.arange(img.shape[0], device=img.device)
        return 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.t(), tgt))
    p = positives.float()
    t_i = p / p.sum(1, keepdim=True)
    t_t = p.t() / p.t().sum(1, keepdim=True)
    return 0.5 * (
        -(t_i * logits.log_softmax(1)).sum(1).mean() - (t_t * logits.t().log_softmax(1)).sum(1).mean()
    )


def sample_hard_negatives(
    sim: torch.Tensor, positives: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each row of ``sim`` (B, B), one column index drawn with probability softmax(sim) over the
    non-positive columns: similar-but-wrong pairs are drawn most often. -1 where a row has no negative."""
    w = sim.detach().float().softmax(1).masked_fill(positives, 0.0)
    none = w.sum(1) <= 0
    w[none] = (~positives[none]).float()  # underflow: fall back to uniform over negatives
    out = torch.full((sim.shape[0],), -1, dtype=torch.long, device=sim.device)
    ok = w.sum(1) > 0
    if ok.any():
        out[ok] = torch.multinomial(w[ok], 1, generator=generator).squeeze(1)
    return out


def itm_loss(
    fusion: ITMFusion,
    img_tok: torch.Tensor,
    txt_tok: torch.Tensor,
    txt_mask: torch.Tensor,
    sim: torch.Tensor,
    positives: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of match / no-match over the B positive pairs and up to 2B hard negatives."""
    b = img_tok.shape[0]
    neg_t = sample_hard_negatives(sim, positives)  # a hard text for each image
    neg_i = sample_hard_negatives(sim.t(), positives.t())  # a hard image for each text
    ar = torch.arange(b, device=img_tok.device)
    vi, vt = neg_t >= 0, neg_i >= 0
    ii = torch.cat([ar, ar[vi], neg_i[vt]])
    tt = torch.cat([ar, neg_t[vi], ar[vt]])
    labels = torch.cat([torch.ones(b), torch.zeros(int(vi.sum()) + int(vt.sum()))]).long().to(img_tok.device)
    logits = fusion(img_tok[ii], txt_tok[tt], txt_mask[tt])
    return F.cross_entropy(logits, labels)


def same_text(texts: list[str]) -> torch.Tensor:
    """(B, B) bool: report i and report j are the same text (so neither is a negative of the other)."""
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    k = torch.tensor([ids[t] for t in texts])
    return k[:, None] == k[None, :]


# ---- model ---------------------------------------------------------------------------------------------
def image_blocks(enc: nn.Module) -> list[nn.Module]:
    for name in ("blocks", "stages", "layers"):
        b = getattr(enc, name, None)
        if isinstance(b, (nn.ModuleList, nn.Sequential)):
            return list(b)
    return []


def image_features(
    enc: nn.Module, x: torch.Tensor, tokens: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pooled embedding (B, D), visual tokens (B, N, D) or None).

    ViTs give both from one pass (class token + patch tokens); other encoders give the deepest feature map
    flattened to tokens (a second pass, only when tokens are needed).
    """
    if hasattr(enc, "patch_tokens") and hasattr(enc, "forward_tokens"):
        t = enc.forward_tokens(enc.patch_tokens(x))
        pooled = t[:, 0] if getattr(enc, "global_pool", "token") == "token" else t[:, 1:].mean(1)
        return pooled, t
    pooled = enc(x)
    if not tokens:
        return pooled, None
    fmap = enc.forward_features(x)[-1]
    return pooled, fmap.flatten(2).transpose(1, 2)


class FeatureNorm(nn.BatchNorm1d):
    """Batch-normalised features (no affine); a batch (or gradient-cache chunk) of one uses running stats."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, training=False, eps=self.eps)
        return super().forward(x)


class ClipModel(nn.Module):
    """Image tower + text tower + projections (+ ITM fusion, + report decoder)."""

    def __init__(
        self, cfg: ClipConfig, encoder: nn.Module, text: TextTower, vocab: WordVocab | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.text = text
        d_img, d_txt = int(encoder.embed_dim), int(text.embed_dim)
        self.img_norm = FeatureNorm(d_img) if cfg.proj_norm == "batch" else nn.Identity()
        self.img_proj = nn.Linear(d_img, cfg.proj_dim, bias=False)
        self.txt_norm = FeatureNorm(d_txt) if cfg.proj_norm == "batch" else nn.Identity()
        self.txt_proj = nn.Linear(d_txt, cfg.proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.fusion = ITMFusion(d_txt, d_img, cfg.fusion_dim, cfg.fusion_depth) if cfg.w_itm > 0 else None
        self.vocab = vocab
        self.decoder = None
        if cfg.w_caption > 0:
            if vocab is None:
                raise ConfigError("report generation needs a vocabulary built from training reports")
            self.decoder = ReportDecoder(
                len(vocab), d_img, cfg.decoder_dim, cfg.decoder_depth, max_len=cfg.max_report_len
            )

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def needs_tokens(self) -> bool:
        return self.fusion is not None or self.decoder is not None

    def embed_image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled, tok = image_features(self.encoder, x, tokens=self.needs_tokens())
        return F.normalize(self.img_proj(self.img_norm(pooled)), dim=-1), tok

    @property
    def text_cache_layer(self) -> int | None:
        """First trainable text block when the blocks below it are locked (their outputs can be cached)."""
        n = len(self.text.layers())
        lock = self.cfg.lock_text
        return n - lock if n and 0 <= lock <= n else None

    def embed_text_ids(
        self, ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Joint-space text embedding and token states; ``hidden`` = cached states entering the first
        trainable block (see TextTower.hidden_at), or (B, D) pooled features from ``text_cache`` when the
        whole tower is locked (token states are then None)."""
        if hidden is not None and hidden.ndim == 2:
            return F.normalize(self.txt_proj(self.txt_norm(hidden)), dim=-1), None
        if hidden is not None and self.text_cache_layer is not None:
            tok = self.text.forward_from(hidden, mask, self.text_cache_layer)
        else:
            tok = self.text.forward_tokens(ids, mask)
        return F.normalize(self.txt_proj(self.txt_norm(mean_pool(tok, mask))), dim=-1), tok

    @torch.no_grad()
    def text_cache(self, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 128) -> torch.Tensor | None:
        """What the locked part of the text tower gives for every report, computed once before training.

        Whole tower locked and no ITM head (which needs token states): mean-pooled features (N, D), so a step
        pays only for the projection. Lower blocks locked: states entering the first trainable block
        (N, L, D). Nothing locked: None. Locked blocks run without dropout (TextTower.hidden_at).
        """
        layer = self.text_cache_layer
        if layer is None:
            return None
        pooled = layer == len(self.text.layers()) and self.fusion is None
        out = []
        for i in range(0, len(ids), batch_size):
            sl = slice(i, i + batch_size)
            h = self.text.hidden_at(ids[sl].to(self.device), mask[sl].to(self.device), layer)
            out.append((mean_pool(h, mask[sl].to(self.device)) if pooled else h).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """L2-normalised image embeddings in the joint space (eval mode, no grad)."""
        self.eval()
        out = []
        for i in range(0, len(images), batch_size):
            pooled = image_features(self.encoder, images[i : i + batch_size].to(self.device), tokens=False)[0]
            out.append(F.normalize(self.img_proj(self.img_norm(pooled)), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.cfg.proj_dim)

    @torch.no_grad()
    def sentence_features(self, sentences: list[str], batch_size: int = 128) -> torch.Tensor:
        """Mean-pooled text-tower features (S, D) of single sentences (before normalisation/projection)."""
        self.eval()
        out = []
        for i in range(0, len(sentences), batch_size):
            tok = self.text.tokenize(sentences[i : i + batch_size], self.cfg.max_text_len)
            ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            out.append(mean_pool(self.text.forward_tokens(ids, mask), mask).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.text.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised text embeddings in the joint space (eval mode, no grad)."""
        self.eval()
        if self.cfg.text_pooling == "sentences":
            sents, index = sentence_index(list(texts))
            pooled = pool_sentences(self.sentence_features(sents), index).to(self.device)
            return F.normalize(self.txt_proj(self.txt_norm(pooled)), dim=-1).cpu()
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.text.tokenize(texts[i : i + batch_size], self.cfg.max_text_len)
            z, _ = self.embed_text_ids(
                tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            )
            out.append(z.cpu())
        return torch.cat(out) if out else torch.zeros(0, self.cfg.proj_dim)

    @torch.no_grad()
    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        self.eval()
        return image_features(self.encoder, images.to(self.device), tokens=True)[1]

    @torch.no_grad()
    def match_scores(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """ITM probability that texts[i] describes images[i] (needs a model trained with w_itm > 0)."""
        if self.fusion is None:
            raise ConfigError("this run has no image-text matching head (train with --w-itm > 0)")
        self.eval()
        tok = self.text.tokenize(texts, self.cfg.max_text_len)
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        t = self.text.forward_tokens(ids, mask)
        return self.fusion.match_prob(self.visual_tokens(images), t, mask).cpu()

    @torch.no_grad()
    def generate(self, images: torch.Tensor, beam: int = 1, max_len: int | None = None) -> list[str]:
        """Reports written by the decoder (greedy for beam=1, else beam search)."""
        if self.decoder is None or self.vocab is None:
            raise ConfigError("this run has no report decoder (train with --w-caption > 0)")
        self.eval()
        mem = self.visual_tokens(images)
        ids = self.decoder.generate(mem, self.vocab.bos, self.vocab.eos, max_len=max_len, beam=beam)
        return [self.vocab.decode(s) for s in ids]

    # ---- training objective ------------------------------------------------------------------------
    def chunk_outputs(
        self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> tuple:
        zi, itok = self.embed_image(images)
        zt, ttok = self.embed_text_ids(ids, mask, hidden)
        return zi, zt, itok, ttok

    def local_losses(
        self,
        zi: torch.Tensor,
        zt: torch.Tensor,
        itok: torch.Tensor | None,
        ttok: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        caption_tokens: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The per-sample objectives (ITM, captioning) on one batch or chunk."""
        out: dict[str, torch.Tensor] = {}
        if self.fusion is not None and itok is not None:
            out["itm"] = itm_loss(self.fusion, itok, ttok, mask, (zi @ zt.t()).detach(), pos)
        if self.decoder is not None and itok is not None and caption_tokens is not None:
            out["caption"] = self.decoder.loss(caption_tokens, itok, self.vocab.pad)
        return out


def build_clip(cfg: ClipConfig, train_texts: list[str] | None = None) -> ClipModel:
    """A fresh model from a config (the image tower from scratch or from ``cfg.init_from``), or every
    weight from the CLIP run ``cfg.init_clip``."""
    from medfm.models.io import load_encoder
    from medfm.models.registry import create_encoder

    if cfg.init_clip:
        return _from_run(cfg, cfg.init_clip, train_texts)
    if cfg.init_from:
        enc = load_encoder(cfg.init_from, in_chans=cfg.in_chans, img_size=cfg.img_size)
    else:
        enc = create_encoder(
            cfg.encoder,
            spatial_dims=cfg.spatial_dims,
            in_chans=cfg.in_chans,
            img_size=cfg.img_size,
            **cfg.encoder_kwargs,
        )
    text = create_text_tower(
        cfg.text_tower, **({"path": cfg.text_path} if cfg.text_path else {}), max_length=cfg.max_text_len
    )
    vocab = WordVocab.build(train_texts or [], cfg.vocab_min_count) if cfg.w_caption > 0 else None
    model = ClipModel(cfg, enc, text, vocab)
    lock_tower(model.encoder, image_blocks(model.encoder), cfg.lock_image)
    lock_tower(model.text, model.text.layers(), cfg.lock_text)
    return model


def _from_run(cfg: ClipConfig, run: str | Path, train_texts: list[str] | None, strict: bool = False
              ) -> ClipModel:
    """The model of ``cfg`` with all weights the CLIP run ``run`` has; unless ``strict``, modules that run
    lacks (an ITM head, a decoder) start fresh and modules ``cfg`` switches off are dropped."""
    src = load_clip(run)
    vocab = src.vocab
    if vocab is None and cfg.w_caption > 0:
        vocab = WordVocab.build(train_texts or [], cfg.vocab_min_count)
    model = ClipModel(cfg, src.encoder, src.text, vocab if cfg.w_caption > 0 else None)
    try:
        model.load_state_dict(src.state_dict(), strict=strict)
    except RuntimeError as e:  # shape mismatches: proj_dim, fusion or decoder sizes differ
        detail = str(e).strip().splitlines()[-1].strip()
        raise ConfigError(f"cannot start from CLIP run {run}: {detail}") from None
    model.train()
    lock_tower(model.encoder, image_blocks(model.encoder), cfg.lock_image)
    lock_tower(model.text, model.text.layers(), cfg.lock_text)
    return model


# ---- run directory -------------------------------------------------------------------------------------
def save_clip(model: ClipModel, out: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    from medfm.models.io import save_encoder

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_encoder(model.encoder, out)
    model.text.save(out / "text")
    heads = {f"img_proj.{k}": v for k, v in model.img_proj.state_dict().items()}
    heads |= {f"txt_proj.{k}": v for k, v in model.txt_proj.state_dict().items()}
    heads |= {f"img_norm.{k}": v.float() for k, v in model.img_norm.state_dict().items()}
    heads |= {f"txt_norm.{k}": v.float() for k, v in model.txt_norm.state_dict().items()}
    heads["logit_scale"] = model.logit_scale.detach().reshape(1)
    if model.fusion is not None:
        heads |= {f"fusion.{k}": v for k, v in model.fusion.state_dict().items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.items()}, str(out / "heads.safetensors"))
    if model.decoder is not None and model.vocab is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.decoder.state_dict().items()},
            str(out / "decoder.safetensors"),
        )
        write_json(out / "vocab.json", model.vocab.to_dict())
    cfg = asdict(model.cfg)
    write_json(
        out / "config.json",
        {
            "kind": "clip",
            "clip": cfg,
            "encoder": model.encoder.config,
            "text": {"dir": "text", "embed_dim": model.text.embed_dim, "source": model.text.config},
            "environment": environment(),
        },
    )
    if metrics is not None:
        write_json(out / "metrics.json", metrics)
    return out


def load_clip(run_dir: str | Path, device: str | torch.device = "cpu") -> ClipModel:
    """Rebuild a trained CLIP model from its run directory (no pickles: safetensors + JSON only)."""
    from medfm.models.io import load_encoder

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise InputError(run, "not a run directory (no config.json)")
    conf = read_json(run / "config.json")
    if conf.get("kind") != "clip":
        raise InputError(run, f"not a CLIP run (kind={conf.get('kind')!r}); train one with `medfm clip`")
    cfg = ClipConfig.from_dict(conf["clip"])
    enc = load_encoder(run)
    text = TextTower(run / "text", max_length=cfg.max_text_len)
    vocab = WordVocab.from_dict(read_json(run / "vocab.json")) if (run / "vocab.json").is_file() else None
    model = ClipModel(cfg, enc, text, vocab)
    heads = load_file(str(run / "heads.safetensors"))
    model.img_proj.load_state_dict({k[9:]: v for k, v in heads.items() if k.startswith("img_proj.")})
    model.txt_proj.load_state_dict({k[9:]: v for k, v in heads.items() if k.startswith("txt_proj.")})
    for name in ("img_norm", "txt_norm"):
        mod = getattr(model, name)
        norm = {k[len(name) + 1 :]: v for k, v in heads.items() if k.startswith(name + ".")}
        if norm:
            mod.load_state_dict({k: v.to(mod.state_dict()[k].dtype) for k, v in norm.items()})
    with torch.no_grad():
        model.logit_scale.copy_(heads["logit_scale"].reshape(()))
    if model.fusion is not None:
        model.fusion.load_state_dict({k[7:]: v for k, v in heads.items() if k.startswith("fusion.")})
    if model.decoder is not None:
        model.decoder.load_state_dict(load_file(str(run / "decoder.safetensors")))
    return model.to(device).eval()


# ---- training ------------------------------------------------------------------------------------------
def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Small random shift (up to 1/16 of the size) and contrast/brightness jitter; no flips (laterality)."""
    b = x.shape[0]
    nd = x.ndim - 2
    shift = [int(torch.randint(-(s // 16), s // 16 + 1, (1,), generator=g)) for s in x.shape[2:]]
    x = torch.roll(x, shifts=shift, dims=tuple(range(2, 2 + nd)))
    c = 1 + 0.2 * (torch.rand(b, *([1] * (nd + 1)), generator=g) - 0.5)
    br = 0.1 * (torch.rand(b, *([1] * (nd + 1)), generator=g) - 0.5)
    return ((x - 0.5) * c + 0.5 + br).clamp(0, 1)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _progress(total: int, desc: str, initial: int = 0) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False,
                disable=os.environ.get("MEDFM_PROGRESS", "1") == "0")


def train_step(
    model: ClipModel,
    images: torch.Tensor,
    texts: list[str],
    ids: torch.Tensor,
    mask: torch.Tensor,
    cap: torch.Tensor | None,
    hidden: torch.Tensor | None = None,
) -> dict[str, float]:
    """One optimisation step's forward + backward (gradients accumulated in .grad, no optimizer step)."""
    cfg = model.cfg
    pos = same_text(texts).to(images.device)
    b = images.shape[0]
    if cfg.grad_cache_chunk and cfg.grad_cache_chunk < b:

        def embed(sl: slice) -> tuple:
            return model.chunk_outputs(
                images[sl], ids[sl], mask[sl], hidden[sl] if hidden is not None else None
            )

        def loss_fn(full: list[torch.Tensor]) -> torch.Tensor:
            return cfg.w_contrastive * clip_loss(full[0], full[1], model.scale(), pos)

        parts: dict[str, float] = {}

        def extra(sl: slice, outs: tuple) -> torch.Tensor:
            zi, zt, itok, ttok = outs
            local = model.local_losses(
                zi, zt, itok, ttok, mask[sl], pos[sl, sl], cap[sl] if cap is not None else None
            )
            frac = (sl.stop - sl.start) / b
            tot = torch.zeros((), device=images.device)
            for k, v in local.items():
                parts[k] = parts.get(k, 0.0) + float(v.detach()) * frac
                tot = tot + getattr(cfg, f"w_{k}") * v * frac
            return tot

        closs, _ = cached_backward(
            embed, b, cfg.grad_cache_chunk, loss_fn, 2, extra if model.needs_tokens() else None, images.device
        )
        parts["contrastive"] = float(closs) / max(cfg.w_contrastive, 1e-12)
        parts["loss"] = float(closs) + sum(
            getattr(cfg, f"w_{k}") * v for k, v in parts.items() if k in ("itm", "caption")
        )
        return parts
    zi, zt, itok, ttok = model.chunk_outputs(images, ids, mask, hidden)
    losses = {"contrastive": clip_loss(zi, zt, model.scale(), pos)} if cfg.w_contrastive > 0 else {}
    losses |= model.local_losses(zi, zt, itok, ttok, mask, pos, cap)
    total = sum(getattr(cfg, f"w_{k}") * v for k, v in losses.items())
    total.backward()
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


def train_clip(cfg: ClipConfig, progress: bool = True) -> Path:
    """Train on ``cfg.data`` and write the run directory ``cfg.out``; returns its path."""
    from torch.utils.data import DataLoader

    from medfm.tasks.vlm.data import ImageTextDataset, collate

    if not cfg.out:
        raise ConfigError("no output run directory given")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = _pick_device(cfg.device)
    ds = ImageTextDataset(cfg.data, split=cfg.split, img_size=cfg.img_size, in_chans=cfg.in_chans)
    if len(ds) < 2:
        raise InputError(cfg.data, "need at least 2 image-report pairs")
    if not any(t.strip() for t in ds.texts):
        raise InputError(cfg.data, "no report text found (manifest column 'report' / 'text')")
    state_dir = None
    if cfg.resume:
        state_dir = clip_state.resume_dir(cfg.out)
        if state_dir is None:
            raise InputError(cfg.out, "nothing to resume: no resume/ state (a run keeps one when it stops on "
                                      "its time budget, --max-seconds, or every --checkpoint-every steps)")
    model = (build_clip(cfg, ds.texts) if state_dir is None else _from_run(cfg, state_dir, ds.texts, True))
    model = model.to(device)
    tok = model.text.tokenize(ds.texts, cfg.max_text_len)  # tokenise once: the tokenizer is the slow part
    # locked text blocks run once over the whole dataset, not every step (reports repeat a lot)
    cache, sent = None, None
    if cfg.text_pooling == "sentences":  # per-sentence features once; each step pools (a subset of) them
        sents, sent_index = sentence_index(ds.texts)
        sent = (model.sentence_features(sents), sent_index)
    else:
        cache = model.text_cache(tok["input_ids"], tok["attention_mask"])
    caps = model.vocab.batch(ds.texts, cfg.max_report_len) if model.vocab is not None else None

    bs = min(cfg.batch_size, len(ds))
    g = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        ds,
        batch_size=bs,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        num_workers=cfg.workers,
        generator=g,
    )
    steps = cfg.epochs * len(loader)
    if cfg.max_steps > 0:
        steps = min(steps, cfg.max_steps) if steps else cfg.max_steps
    text_params = [p for p in model.text.parameters() if p.requires_grad]
    text_ids = {id(p) for p in text_params}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in text_ids]
    groups = [{"params": other, "lr": cfg.lr}]
    if text_params:
        groups.append({"params": text_params, "lr": cfg.text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    history: list[dict[str, float]] = []
    start, seconds_before = 0, 0.0
    if state_dir is not None:
        done = clip_state.load_state(state_dir, opt, g)
        start, seconds_before, history = int(done["step"]), float(done["train_seconds"]), done["history"]
    warm = max(1, int(cfg.warmup_frac * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(  # a resumed run picks the schedule up at its step
        opt,
        lambda s: min(1.0, (s + start + 1) / warm)
        * (0.5 * (1 + math.cos(math.pi * min(s + start, steps) / steps)))
        + 1e-3,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, step, pairs, stopped = time.perf_counter(), start, 0, False

    def checkpoint() -> None:
        clip_state.save_state(cfg.out, lambda d: save_clip(model, d), opt, g, {
            "step": step, "train_seconds": seconds_before + time.perf_counter() - t0, "history": history})

    bar = _progress(steps, "clip", start) if progress else None
    model.train()
    while step < steps and not stopped:
        for batch in loader:
            stopped = cfg.max_seconds > 0 and step > start and time.perf_counter() - t0 > cfg.max_seconds
            if step >= steps or stopped:
                break
            idx = batch["index"]
            x = batch["image"].to(device)
            if cfg.augment:
                x = _augment(x, g)
            ids = tok["input_ids"][idx]
            mask = tok["attention_mask"][idx]
            keep = int(mask.sum(1).max())  # trim the padding the whole-dataset tokenisation added
            ids, mask = ids[:, :keep].to(device), mask[:, :keep].to(device)
            cap = None
            if caps is not None:
                c = caps[idx]
                cap = c[:, : int((c != model.vocab.pad).sum(1).max())].to(device)
            opt.zero_grad(set_to_none=True)
            hid = None
            if sent is not None:
                drop = cfg.sentence_dropout if cfg.augment else 0.0
                hid = pool_sentences(sent[0], sent[1][idx], drop, g).to(device)
            elif cache is not None:
                hid = (cache[idx] if cache.ndim == 2 else cache[idx][:, :keep]).to(device)
            rec = train_step(model, x, batch["text"], ids, mask, cap, hid)
            torch.nn.utils.clip_grad_norm_([p for gr in groups for p in gr["params"]], 1.0)
            lr_now = float(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            with torch.no_grad():  # CLIP's clamp, also on the stored value so it cannot drift away
                model.logit_scale.clamp_(0, math.log(cfg.max_logit_scale))
            step += 1
            pairs += x.shape[0]
            rec.update(step=step, temperature=float(1 / model.scale().detach()), lr=lr_now)
            history.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < steps:
                checkpoint()
    if bar is not None:
        bar.close()
    if stopped:
        checkpoint()  # continue later with resume=True
    else:
        clip_state.drop_state(cfg.out)
    secs = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "steps": step,
        "total_steps": steps,
        "stopped_early": stopped,
        "pairs": len(ds),
        "train_seconds": round(seconds_before + secs, 2),
        "pairs_per_s": round(pairs / max(secs, 1e-9), 2),
        "final_loss": sum(h["loss"] for h in history[-10:]) / max(len(history[-10:]), 1),
        "temperature": float(1 / model.scale().detach()),
        "history": history,
    }
    if device.type == "cuda":
        metrics["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    out = save_clip(model.cpu().eval(), cfg.out, metrics)
    _plot_losses(history, out / "loss.png")
    _model_card(cfg, metrics, out)
    return out


def _plot_losses(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in ("loss", "contrastive", "itm", "caption"):
        ys = [h[k] for h in history if k in h]
        if ys:
            ax.plot(range(1, len(ys) + 1), ys, label=k, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _model_card(cfg: ClipConfig, metrics: dict[str, Any], out: Path) -> None:
    objectives = [
        f"{k} (weight {getattr(cfg, 'w_' + k)})"
        for k in ("contrastive", "itm", "caption")
        if getattr(cfg, "w_" + k) > 0
    ]

    def lock(n: int, unit: str) -> str:
        return "locked" if n == 0 else "trained" if n < 0 else f"last {n} {unit} trained"

    cache = f" (gradient cache chunks of {cfg.grad_cache_chunk})" if cfg.grad_cache_chunk else ""
    lines = [
        "# CLIP-style vision-language model",
        "",
        f"- Image tower: `{cfg.init_from or cfg.encoder}` ({cfg.spatial_dims}D, {cfg.in_chans} channel(s), "
        f"{cfg.img_size}px), {lock(cfg.lock_image, 'blocks')}",
        f"- Text tower: `{cfg.text_path or cfg.text_tower}`, {lock(cfg.lock_text, 'layers')}; "
        + (
            f"a report = mean of its sentence embeddings (sentence dropout {cfg.sentence_dropout})"
            if cfg.text_pooling == "sentences"
            else "one embedding per report"
        ),
        f"- Objectives: {', '.join(objectives)}",
        *([f"- Warm start: every weight from the CLIP run `{cfg.init_clip}`"] if cfg.init_clip else []),
        *([f"- **Stopped early** at step {metrics['steps']} of {metrics['total_steps']} (time budget): "
           "continue with `--resume` (state in `resume/`)"] if metrics.get("stopped_early") else []),
        f"- Data: `{cfg.data}` (split {cfg.split}), {metrics['pairs']} image-report pairs, "
        f"{metrics['steps']} steps, batch {cfg.batch_size}{cache}",
        f"- Final training loss {metrics['final_loss']:.4f}, temperature {metrics['temperature']:.4f}",
        "",
        "Files: `model.safetensors` (image tower, `medfm.models.io.load_encoder`), `text/` (Hugging Face",
        "format), `heads.safetensors` (projections, temperature, ITM head), `decoder.safetensors` +",
        "`vocab.json` (report decoder), `metrics.json`, `loss.png`.",
        "",
        "Use: `medfm zeroshot RUN DATA`, `medfm retrieve RUN DATA --query ...`, `medfm report RUN IMAGE`,",
        "`medfm vqa RUN DATA`. Intended use: research. Zero-shot scores and generated reports are not",
        "validated for clinical decisions.",
    ]
    text = "\n".join(lines) + "\n"
    (out / "README.md").write_text(text)
