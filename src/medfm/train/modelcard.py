"""Human-readable outputs of a pretraining run: the loss curve plot and the README.md model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfm.train.callbacks import read_history


def plot_loss_curve(history_csv: str | Path, out: str | Path, title: str = "") -> Path | None:
    """loss_curve.png from logs/train.csv (None if there are no rows yet)."""
    rows = read_history(history_csv)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_model_card(
    run_dir: str | Path, config: dict[str, Any], metrics: dict[str, Any], data: list[dict[str, Any]]
) -> Path:
    """README.md: what was trained on what, how, the result, and how to load it."""
    run_dir = Path(run_dir)
    cfg = config["pretrain"]
    enc = config["encoder"]
    obj = cfg["objective"]
    detail = (
        f"mask ratio {cfg['mask_ratio']}, decoder {cfg['decoder_dim']}x{cfg['decoder_depth']}, "
        f"norm-pix {cfg['norm_pix']}"
        if obj == "mae"
        else f"positives = {cfg['positives']}, temperature {cfg['temperature']}, projection "
        f"{cfg['proj_hidden']}->{cfg['proj_dim']}"
    )
    data_lines = "\n".join(
        f"| `{d['path']}` | {d.get('split') or 'all'} | {d['images']} | {d.get('patients', '?')} |"
        for d in data
    )
    enc_args = ", ".join(f"{k}={_fmt(v)}" for k, v in enc.items() if k != "name")
    figs = [p for p in ("loss_curve.png", "reconstructions.png", "views.png") if (run_dir / p).is_file()]
    fig_lines = "\n".join(f"![{p}]({p})" for p in figs)
    crops = " crops" if cfg["spatial_dims"] == 3 else ""
    text = f"""# medfm pretrained encoder: {enc["name"]} ({obj})

Self-supervised pretraining with `medfm pretrain {obj}`. No labels were used.

## Encoder
`{enc["name"]}` ({enc_args})

## Data
| dataset | split | images | patients |
|---|---|---|---|
{data_lines}

## Objective
{obj}: {detail}. Input {cfg["spatial_dims"]}D, {cfg["img_size"]} px{crops}.

## Training
{metrics.get("steps")} steps, batch {cfg["batch_size"]} x {metrics.get("world_size", 1)} device(s),
AdamW lr {cfg["lr"]} (warmup + cosine), weight decay {cfg["weight_decay"]}, precision {cfg["precision"]},
seed {cfg["seed"]}.
Final loss **{_fmt(metrics.get("final_loss"))}**; {_fmt(metrics.get("images_per_s"))} images/s;
wall time {_fmt(metrics.get("wall_time_s"))} s.

{fig_lines}

## How to load
```python
import medfm
encoder = medfm.load_encoder("{run_dir}")    # config travels in the safetensors header
embedding = encoder(images)                  # (B, {enc.get("embed_dim", "D")}) pooled features
```

## Limitations
Trained on the data listed above only; features reflect its scanners, sites and populations. Evaluate on
your own downstream tasks (`medfm adapt`, `medfm evaluate`) before any use; not a medical device.
"""
    path = run_dir / "README.md"
    path.write_text(text)
    return path
