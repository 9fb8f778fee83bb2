"""The CLIP-style model: any medfm image encoder + a text tower + joint-space projections, optionally an
image-text matching (ITM) fusion head and a report decoder; its config, build, save and load.

A run directory holds ``model.safetensors`` (the image tower alone, loadable by every medfm command),
``text/`` (Hugging Face format), ``heads.safetensors`` (projections, temperature, ITM fusion),
``decoder.safetensors`` + ``vocab.json``, ``config.json``, ``metrics.json``, ``loss.png`` and ``README.md``.
Training lives in ``medfm.train.clip``, the losses in ``medfm.train.clip_losses``.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from medfm.errors import ConfigError, InputError
from medfm.models.clip_config import ClipConfig
from medfm.models.fusion import ITMFusion
from medfm.models.report_decoder import ReportDecoder, WordVocab
from medfm.models.sentences import pool_sentences, sentence_index
from medfm.models.text import TextTower, create_text_tower, lock_tower, mean_pool
from medfm.rundir import read_json


# ---- model ---------------------------------------------------------------------------------------------
def image_blocks(enc: nn.Module) -> list[nn.Module]:
    """The image tower's layer groups (``Encoder.layer_groups()``: stem first, final norm last), the units
    ``lock_image`` counts: N trains the last N groups, as open_clip's ``unlocked_groups``."""
    groups = getattr(enc, "layer_groups", None)
    if groups is None:  # a foreign nn.Module without the Encoder API
        raise ConfigError(f"{type(enc).__name__} has no layer_groups(); cannot lock part of the image tower")
    return list(groups())


def lock_towers(model: ClipModel, cfg: ClipConfig) -> None:
    """Apply ``lock_image`` / ``lock_text`` (the heads always train)."""
    if cfg.lock_image >= 0:  # the layer groups are only needed (and must exist) when something is locked
        lock_tower(model.encoder, image_blocks(model.encoder), cfg.lock_image)
    lock_tower(model.text, model.text.layers(), cfg.lock_text)


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
        # the training store's preprocessing spec (medfm.data.preprocess), replayed on raw inference inputs
        self.preprocessing: dict[str, Any] | None = None
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


def build_clip(cfg: ClipConfig, train_texts: list[str] | None = None) -> ClipModel:
    """A fresh model from a config (the image tower from scratch or from ``cfg.init_from``), or every
    weight from the CLIP run ``cfg.init_clip``."""
    from medfm.models.io import load_encoder
    from medfm.models.registry import create_encoder

    if cfg.init_clip:
        return from_run(cfg, cfg.init_clip, train_texts)
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
    lock_towers(model, cfg)
    return model


def from_run(cfg: ClipConfig, run: str | Path, train_texts: list[str] | None, strict: bool = False
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
    lock_towers(model, cfg)
    return model


# ---- run directory -------------------------------------------------------------------------------------
def save_clip(model: ClipModel, out: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write the run directory (kind "clip") through medfm.rundir.RunDir; every file atomic."""
    from medfm.models.io import save_encoder
    from medfm.rundir import RunDir

    run = RunDir(out, kind="clip")
    run.path.mkdir(parents=True, exist_ok=True)
    save_encoder(model.encoder, run.path)  # model.safetensors with the encoder config in its header
    model.text.save(run.path / "text")
    heads = {f"img_proj.{k}": v for k, v in model.img_proj.state_dict().items()}
    heads |= {f"txt_proj.{k}": v for k, v in model.txt_proj.state_dict().items()}
    heads |= {f"img_norm.{k}": v.float() for k, v in model.img_norm.state_dict().items()}
    heads |= {f"txt_norm.{k}": v.float() for k, v in model.txt_norm.state_dict().items()}
    heads["logit_scale"] = model.logit_scale.detach().reshape(1)
    if model.fusion is not None:
        heads |= {f"fusion.{k}": v for k, v in model.fusion.state_dict().items()}
    run.write_weights(heads, "heads.safetensors")
    if model.decoder is not None and model.vocab is not None:
        run.write_weights(model.decoder, "decoder.safetensors")
        run.write_json("vocab.json", model.vocab.to_dict())
    run.write_config(
        {
            "clip": asdict(model.cfg),
            "encoder": model.encoder.config,
            "text": {"dir": "text", "embed_dim": model.text.embed_dim, "source": model.text.config},
            **({"preprocessing": model.preprocessing} if model.preprocessing else {}),
        }
    )
    if metrics is not None:
        run.write_metrics(metrics, merge=False)
    return run.path


def load_clip(run_dir: str | Path, device: str | torch.device = "cpu") -> ClipModel:
    """Rebuild a trained CLIP model from its run directory (no pickles: safetensors + JSON only)."""
    from medfm.models.io import load_encoder
    from medfm.rundir import RunDir

    run = Path(run_dir)
    conf = RunDir(run).config()  # InputError when there is no config.json; old runs (format 1) load too
    if conf.get("kind") != "clip":
        raise InputError(run, f"not a CLIP run (kind={conf.get('kind')!r}); train one with `medfm clip`")
    cfg = ClipConfig.from_dict(conf["clip"])
    enc = load_encoder(run)
    text = TextTower(run / "text", max_length=cfg.max_text_len)
    vocab = WordVocab.from_dict(read_json(run / "vocab.json")) if (run / "vocab.json").is_file() else None
    model = ClipModel(cfg, enc, text, vocab)
    model.preprocessing = conf.get("preprocessing")
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

