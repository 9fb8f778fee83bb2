"""Model card sections of the segmentation kinds: "segmenter", "promptable" and "incontext".

Only folder names of data and pretrained runs appear (full paths may carry identifiers of the archive).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medfm.modelcard.common import SECTIONS, fmt


def _name(spec: str) -> str:
    return Path(spec).name if spec else "?"


def pretrained_source(spec: str) -> str:
    """'random initialisation' for a registry name; the pretrained run (objective, steps) otherwise."""
    p = Path(spec) if spec else None
    if p is None or not p.exists():
        return "random initialisation (no pretraining)"
    text = f"pretrained weights from `{p.name}`"
    cfg = p / "config.json" if p.is_dir() else None
    if cfg is not None and cfg.is_file():
        try:
            info = json.loads(cfg.read_text())
        except json.JSONDecodeError:
            return text
        pre = info.get("pretrain", {}) if isinstance(info.get("pretrain"), dict) else {}
        obj = info.get("objective") or pre.get("objective")
        steps = info.get("steps") or pre.get("steps")
        if obj:
            text += f" ({obj}" + (f", {steps} steps" if steps else "") + ")"
    return text


def metric_rows(metrics: dict[str, Any]) -> list[str]:
    """One table row per (evaluation, class) of the ``eval_*`` results."""
    rows = []
    for key, res in metrics.items():
        if not key.startswith("eval_") or not isinstance(res, dict):
            continue
        for cls, m in res.items():
            if not isinstance(m, dict) or "dice" not in m:
                continue
            rows.append(
                f"| {key[5:]} | {cls} | {m.get('n', '?')} | {fmt(m['dice'])} | "
                f"{fmt(m.get('hd95_mm', float('nan')))} {m.get('hd95_unit', 'mm')} | "
                f"{fmt(m.get('surface_dice', float('nan')))} |"
            )
    return rows


@SECTIONS.register("segmenter")
def segmenter(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Encoder, decoder, training and evaluations of a `segment train` run."""
    if config.get("decoder") == "monai_network":  # an imported MONAI bundle: its own section
        from medfm.models.formats.monai_bundle import card_section

        return card_section(config)
    tr = config.get("train", {})
    enc, dec = config.get("encoder"), config.get("decoder", "?")
    classes = ", ".join(config.get("class_names") or []) or "?"
    n_labels = tr.get("n_labels")
    if enc:
        enc_args = ", ".join(f"{k}={fmt(v)}" for k, v in enc.items() if k != "name")
        enc_text = f"`{enc.get('name')}` ({enc_args}); {pretrained_source(str(tr.get('encoder', '')))}."
        enc_text += (
            " Frozen during training."
            if tr.get("freeze_encoder")
            else f" Fine-tuned at lr x {tr.get('encoder_lr_scale')}."
        )
        dec_text = f"`{dec}` decoder, width (feature_size) {config.get('feature_size')}."
    else:
        enc_text = "none: a MONAI UNet baseline trained from scratch (no foundation encoder)."
        dec_text = "MONAI UNet (encoder and decoder in one network)."
    rows = metric_rows(metrics)
    metric_text = (
        "| evaluation | class | cases | Dice | HD95 | surface Dice |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        if rows
        else "Not evaluated yet: `medfm segment evaluate RUN DATA -o EVAL` writes a card with them to EVAL."
    )
    return f"""Dense segmentation trained with `medfm segment train`. Classes (besides background): {classes}.

## Data used
`{_name(tr.get("data", ""))}`, split `{tr.get("train_split") or "all"}`, site `{tr.get("site") or "all"}`:
{config.get("n_train", "?")} labelled cases used ({"all" if n_labels is None else f"--n-labels {n_labels}"},
seed {tr.get("seed")}). {config.get("spatial_dims", "?")}D, {config.get("in_chans", "?")} channel(s), images
resized to {config.get("img_size")} px; training crop / inference window {config.get("patch")}.

## Model
Encoder: {enc_text}
Decoder: {dec_text}

## Training
{tr.get("steps")} steps, batch {tr.get("batch_size")}, AdamW lr {tr.get("lr")} (warmup + cosine), Dice +
cross-entropy loss, augmentation {tr.get("augment")} (left-right flips {tr.get("flip", True)});
{fmt(metrics.get("train_seconds", "?"))} s wall time.

## Metrics
{metric_text}

Commands: `medfm segment evaluate RUN DATA -o EVAL` (Dice, HD95 — mm, or px for images without pixel
spacing — and surface Dice, written to EVAL), `medfm segment predict RUN DATA -o masks/`.
"""


@SECTIONS.register("promptable")
def promptable(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Architecture and training of a `segment prompt-train` run."""
    model, tr = config.get("model") or {}, config.get("train") or {}
    enc = model.get("encoder") or {}
    if "imported" in config and not tr:  # SAM / MedSAM / SAM 2 weights used as they are
        arch = model.get("arch", "sam")
        skipped = config["imported"].get("keys_skipped")
        return f"""Promptable segmentation (`{arch}`) with the source checkpoint's weights unchanged; input
{config.get("img_size", model.get("img_size", "?"))} px, grey repeated to RGB and normalised inside.
{f"{skipped} memory / video keys of the source were not needed for single images and were skipped." if skipped
 else ""}

Use: `medfm segment prompt RUN image.png --box x0,y0,x1,y1 -o mask.png`; fine-tune on a new structure with
`medfm segment prompt-train` (docs/import.md).
"""
    return f"""SAM-style promptable segmentation trained with `medfm segment prompt-train` on box / point
prompts simulated from masks of `{_name(tr.get("data", ""))}` ({config.get("n_train", "?")} images).

## Model
Encoder `{enc.get("name", "?")}`; prompt / mask-decoder width {model.get("prompt_dim", "?")}; input
{config.get("img_size", "?")} px.

## Training
{tr.get("steps", "?")} steps, batch {tr.get("batch_size", "?")}, lr {tr.get("lr", "?")}, box jitter
{tr.get("jitter", "?")}, corrective-click rounds {tr.get("correction_rounds", "?")}; final loss
{fmt(config.get("final_loss"))}.

Use: `medfm segment prompt RUN image.png --box x0,y0,x1,y1 -o mask.png`.
"""


@SECTIONS.register("incontext")
def incontext(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Architecture, training labels and any evaluation of a `segment incontext` run."""
    enc = config.get("encoder") or {}
    enc_args = ", ".join(f"{k}={fmt(v)}" for k, v in enc.items() if k != "name")
    ev = metrics.get("incontext_eval") or {}
    rows = "\n".join(
        f"| {k} | " + ", ".join(f"{n} {fmt(v)}" for n, v in r.items()) + " |" for k, r in ev.items()
    )
    evals = f"| references | Dice |\n|---|---|\n{rows}" if rows else "Not evaluated in this run."
    return f"""In-context segmentation (`medfm segment incontext`): segments a structure given k reference
images with masks, without weight updates. Trained episodically on labels {config.get("train_labels")}.

## Model
Encoder `{enc.get("name", "?")}` ({enc_args}); decoder width {config.get("dim")}, feature size
{config.get("feature_size")}, prior `{config.get("prior", "prototype")}`.

## Evaluation
{evals}

Evaluate held-out labels: `medfm segment incontext DATA --run RUN --test-labels 3,4 -o EVAL`.
"""
