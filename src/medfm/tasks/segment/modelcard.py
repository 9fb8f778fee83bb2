"""README.md model card of a `medfm segment train` run: data, encoder, decoder, training, metrics, usage.

Written when the run is trained and rewritten by `medfm segment evaluate`, so the card always lists the
evaluations merged into metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pretrained_source(spec: str) -> str:
    """'random init' for a registry name; the run dir (and its objective / steps when known) otherwise."""
    p = Path(spec)
    if not spec or not p.exists():
        return "random initialisation (no pretraining)"
    text = f"pretrained weights from `{spec}`"
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


def _metric_rows(metrics: dict[str, Any]) -> list[str]:
    rows = []
    for key, res in metrics.items():
        if not key.startswith("eval_") or not isinstance(res, dict):
            continue
        for cls, m in res.items():
            if not isinstance(m, dict) or "dice" not in m:
                continue
            rows.append(
                f"| {key[5:]} | {cls} | {m.get('n', '?')} | {_fmt(m['dice'])} | "
                f"{_fmt(m.get('hd95_mm', float('nan')))} | {_fmt(m.get('surface_dice', float('nan')))} |"
            )
    return rows


def write_seg_model_card(run_dir: str | Path, conf: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write run_dir/README.md from the run's config.json content and metrics.json content."""
    run_dir = Path(run_dir)
    tr = conf.get("train", {})
    enc = conf.get("encoder")
    dec = conf.get("decoder", "?")
    classes = ", ".join(conf.get("class_names") or []) or "?"
    n_labels = tr.get("n_labels")
    if enc:
        enc_args = ", ".join(f"{k}={_fmt(v)}" for k, v in enc.items() if k != "name")
        enc_text = f"`{enc.get('name')}` ({enc_args}); {_pretrained_source(str(tr.get('encoder', '')))}."
        if tr.get("freeze_encoder"):
            enc_text += " Frozen during training."
        else:
            enc_text += f" Fine-tuned at lr x {tr.get('encoder_lr_scale')}."
        dec_text = f"`{dec}` decoder, width (feature_size) {conf.get('feature_size')}."
    else:
        enc_text = "none: a MONAI UNet baseline trained from scratch (no foundation encoder)."
        dec_text = "MONAI UNet (encoder and decoder in one network)."
    rows = _metric_rows(metrics)
    metric_text = (
        "| evaluation | class | cases | Dice | HD95 (mm) | surface Dice |\n|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        if rows
        else "Not evaluated yet: run `medfm segment evaluate` (the results are added here)."
    )
    text = f"""# medfm segmentation model: {dec} on {enc.get("name") if enc else "no encoder"}

Dense segmentation trained with `medfm segment train`. Classes (besides background): {classes}.

## Data
`{tr.get("data", "?")}`, split `{tr.get("train_split") or "all"}`, site `{tr.get("site") or "all"}`:
{conf.get("n_train", "?")} labelled cases used ({"all" if n_labels is None else f"--n-labels {n_labels}"},
seed {tr.get("seed")}). {conf.get("spatial_dims", "?")}D, {conf.get("in_chans", "?")} channel(s), images
resized to {conf.get("img_size")} px; training crop / inference window {conf.get("patch")}.

## Model
Encoder: {enc_text}
Decoder: {dec_text}

## Training
{tr.get("steps")} steps, batch {tr.get("batch_size")}, AdamW lr {tr.get("lr")} (warmup + cosine), Dice +
cross-entropy loss, augmentation {tr.get("augment")} (left-right flips {tr.get("flip", True)});
{_fmt(metrics.get("train_seconds", "?"))} s wall time.

## Metrics
{metric_text}

## How to use
```bash
medfm segment evaluate {run_dir} DATA --split test     # Dice, HD95, surface Dice (added above)
medfm segment predict {run_dir} DATA -o masks/         # masks aligned with the inputs + overlays
```
```python
from medfm.tasks.segment.train import load_segmentation_run
model, conf = load_segmentation_run("{run_dir}")
```

## Limitations
Trained only on the data above; expect lower accuracy on other sites, scanners and populations (evaluate
there first). Not a medical device.
"""
    path = run_dir / "README.md"
    path.write_text(text)
    return path


def refresh_seg_model_card(run_dir: str | Path) -> Path:
    """Rewrite README.md from the run's config.json and metrics.json (after new evaluations)."""
    run_dir = Path(run_dir)
    conf = json.loads((run_dir / "config.json").read_text())
    mp = run_dir / "metrics.json"
    metrics = json.loads(mp.read_text()) if mp.is_file() else {}
    return write_seg_model_card(run_dir, conf, metrics)
