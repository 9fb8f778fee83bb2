"""CLIP-style image-report pretraining: any medfm image encoder + a text tower, trained with a weighted sum of

- symmetric InfoNCE with a learnable, clamped temperature (CLIP);
- image-text matching (ITM) on hard negatives sampled from the contrastive similarities, scored by a small
  cross-attention fusion module (ALBEF/BLIP);
- report generation: next-token loss of a small decoder that cross-attends to the visual tokens (CoCa-like).

Either tower can be locked fully or all but its last N blocks (LiT-style locked image tuning). Large effective
batches fit small memory through gradient caching (train/gradcache.py). The model, its config and run-dir
io live in ``medfm.models.clip``, the losses in ``medfm.train.clip_losses``; their names are re-exported here
for existing importers.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from medfm.data.preprocess import preprocessing_of
from medfm.errors import ConfigError, InputError
from medfm.models.clip import (  # noqa: F401  (image_blocks, load_clip re-exported: importers use medfm.train.clip)
    ClipConfig,
    ClipModel,
    build_clip,
    from_run,
    image_blocks,
    load_clip,
    save_clip,
)
from medfm.models.sentences import pool_sentences, sentence_index
from medfm.rundir import RunDir
from medfm.train import clip_state
from medfm.train.augment import CLIP_AUGMENT, augment_batch
from medfm.train.clip_losses import (  # noqa: F401  (re-exported)
    clip_loss,
    itm_loss,
    same_text,
    sample_hard_negatives,
)
from medfm.train.gradcache import cached_backward
from medfm.train.precision import (
    Precision,
    StepTimer,
    compile_function,
    optimizer_step,
    resolve_precision,
    scaled_backward,
)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _progress(total: int, desc: str, initial: int = 0) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False,
                disable=os.environ.get("MEDFM_PROGRESS", "1") == "0")


def local_losses(
    model: ClipModel,
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
    if model.fusion is not None and itok is not None:
        out["itm"] = itm_loss(model.fusion, itok, ttok, mask, (zi @ zt.t()).detach(), pos)
    if model.decoder is not None and itok is not None and caption_tokens is not None:
        out["caption"] = model.decoder.loss(caption_tokens, itok, model.vocab.pad)
    return out


def train_step(
    model: ClipModel,
    images: torch.Tensor,
    texts: list[str],
    ids: torch.Tensor,
    mask: torch.Tensor,
    cap: torch.Tensor | None,
    hidden: torch.Tensor | None = None,
    prec: Precision | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One optimisation step's forward + backward (gradients accumulated in .grad, no optimizer step).

    ``prec``: autocast for the towers and per-sample losses (the contrastive loss over the full batch of
    gradient-cached embeddings runs in float32); ``scaler``: fp16 loss scaling (not with gradient caching).
    """
    cfg = model.cfg
    prec = prec or Precision("32", images.device.type, None)
    pos = same_text(texts).to(images.device)
    b = images.shape[0]
    if cfg.grad_cache_chunk and cfg.grad_cache_chunk < b:

        if scaler is not None:
            raise ConfigError("--precision 16-mixed cannot be combined with --grad-cache (fp16 loss scaling "
                              "through cached gradients); use bf16-mixed")

        def embed(sl: slice) -> tuple:
            with prec.autocast():
                outs = model.chunk_outputs(
                    images[sl], ids[sl], mask[sl], hidden[sl] if hidden is not None else None
                )
            return tuple(o.float() if o is not None and o.is_floating_point() else o for o in outs)

        def loss_fn(full: list[torch.Tensor]) -> torch.Tensor:
            return cfg.w_contrastive * clip_loss(full[0], full[1], model.scale(), pos)

        parts: dict[str, float] = {}

        def extra(sl: slice, outs: tuple) -> torch.Tensor:
            zi, zt, itok, ttok = outs
            with prec.autocast():
                local = local_losses(
                    model, zi, zt, itok, ttok, mask[sl], pos[sl, sl], cap[sl] if cap is not None else None
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
    with prec.autocast():
        zi, zt, itok, ttok = model.chunk_outputs(images, ids, mask, hidden)
        losses = {"contrastive": clip_loss(zi.float(), zt.float(), model.scale(), pos)} \
            if cfg.w_contrastive > 0 else {}
        losses |= local_losses(model, zi, zt, itok, ttok, mask, pos, cap)
        total = sum(getattr(cfg, f"w_{k}") * v.float() for k, v in losses.items())
    scaled_backward(total, scaler)
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


def train_clip(cfg: ClipConfig, progress: bool = True) -> Path:
    """Train on ``cfg.data`` and write the run directory ``cfg.out``; returns its path."""
    from torch.utils.data import DataLoader

    from medfm.data.pairs import ImageTextDataset, collate

    if not cfg.out:
        raise ConfigError("no output run directory given")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = _pick_device(cfg.device)
    prec = resolve_precision(cfg.precision, device)  # a combination this device cannot run: one line, now
    scaler = prec.grad_scaler()
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
    model = (build_clip(cfg, ds.texts) if state_dir is None else from_run(cfg, state_dir, ds.texts, True))
    model = model.to(device)
    if ds.prepared is not None:  # inference on raw files replays what prepare did to the training data
        model.preprocessing = preprocessing_of(cfg.data)
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
    timer = StepTimer()
    # the towers run through chunk_outputs (not forward): compile that; state-dict keys are unchanged
    model.chunk_outputs = compile_function(model.chunk_outputs, cfg.compile, "clip towers")
    model.train()
    while step < steps and not stopped:
        for batch in loader:
            timer.batch_ready()
            stopped = cfg.max_seconds > 0 and step > start and time.perf_counter() - t0 > cfg.max_seconds
            if step >= steps or stopped:
                break
            idx = batch["index"]
            x = batch["image"].to(device)
            if cfg.augment:
                x = augment_batch(x, g, CLIP_AUGMENT)
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
            rec = train_step(model, x, batch["text"], ids, mask, cap, hid, prec, scaler)
            lr_now = float(opt.param_groups[0]["lr"])
            optimizer_step(opt, scaler, [p for gr in groups for p in gr["params"]], 1.0)
            sched.step()
            timer.step_done()
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
    model.__dict__.pop("chunk_outputs", None)  # back to the eager method before saving / deep copies
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
        "precision": cfg.precision,
        "compile": cfg.compile,
        **timer.summary(),
        "history": history,
    }
    if device.type == "cuda":
        metrics["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    out = save_clip(model.cpu().eval(), cfg.out, metrics)
    run = RunDir(out, kind="clip")
    _plot_losses(history, run)
    _write_card(run)
    return out


# ---- options (CLI) -> config ---------------------------------------------------------------------------
# option names that differ from ClipConfig fields; every other option with a field's name is copied as is
_RENAMED = {"grad_cache": "grad_cache_chunk"}
_OPTIONAL = ("init_from", "init_clip")  # "" (the CLI's unset) -> None


def _json_option(value: str, name: str) -> dict[str, Any]:
    if not value:
        return {}
    try:
        v = json.loads(value)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{name} must be JSON, e.g. '{{\"depth\": 4}}' ({e})") from None
    if not isinstance(v, dict):
        raise ConfigError(f"{name} must be a JSON object")
    return v


def small_encoder_defaults(encoder: str, patch_size: int | None, depth: int | None) -> dict[str, int]:
    """Patch size 8 and depth 4 (a small scratch ViT for CPU budgets) where the encoder takes them; an option
    given explicitly to an encoder without it is an error, not silently dropped."""
    from medfm.models.registry import encoder_options

    opts = encoder_options(encoder)
    given = {k: v for k, v in (("patch_size", patch_size), ("depth", depth)) if v is not None}
    wrong = sorted(set(given) - opts)
    if wrong:
        raise ConfigError(f"encoder '{encoder}' has no option(s) {', '.join(wrong)}; see `medfm models info`")
    return {k: v for k, v in ({"patch_size": 8, "depth": 4} | given).items() if k in opts}


def config_from_options(options: dict[str, Any]) -> ClipConfig:
    """A ClipConfig from command-line options named like its fields (generic, so new fields need no glue).

    CLI-only spellings: ``split="all"`` (every case), ``""`` for unset paths, ``encoder_args`` (JSON) with
    ``patch_size`` / ``depth`` shortcuts, ``text_tower`` given as a local Hugging Face directory.
    """
    opts = {_RENAMED.get(k, k): v for k, v in options.items()}
    known = {f.name for f in fields(ClipConfig)}
    kw = {k: v for k, v in opts.items() if k in known}
    for k in _OPTIONAL:
        if k in kw:
            kw[k] = kw[k] or None
    if kw.get("split") == "all":
        kw["split"] = None
    enc_kw = _json_option(opts.get("encoder_args", ""), "--encoder-args")
    if not kw.get("init_from"):
        enc_kw = small_encoder_defaults(
            kw.get("encoder", ClipConfig.encoder), opts.get("patch_size"), opts.get("depth")
        ) | enc_kw
    kw["encoder_kwargs"] = enc_kw
    tower = kw.get("text_tower", ClipConfig.text_tower)
    if tower not in ("minilm", "hf_local"):
        kw["text_path"], kw["text_tower"] = tower, "hf_local"
    return ClipConfig(**kw)


def train_from_options(options: dict[str, Any], progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """`medfm clip`: build the config from the options, train, and return (run dir, metrics)."""
    run = train_clip(config_from_options(options), progress)
    return run, json.loads((run / "metrics.json").read_text())


def _plot_losses(history: list[dict[str, float]], run: RunDir) -> None:
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
    run.save_figure(fig, "loss.png")


def _write_card(run: RunDir) -> None:
    """README.md through the shared model-card writer; its CLIP section alone while that is not there."""
    import importlib

    cards = importlib.import_module("medfm.modelcard")
    if hasattr(cards, "write_card"):
        run.write_card()
        return
    from medfm.modelcard.clip import section

    run.write_text("README.md", section(run.config(), run.metrics()).replace("## ", "# ", 1))
