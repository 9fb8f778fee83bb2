"""Model-card section of CLIP runs (kind "clip"): towers, locking, objectives, data, training outcome."""

from __future__ import annotations

from typing import Any


def _lock(n: int, unit: str) -> str:
    return "locked" if n == 0 else "trained" if n < 0 else f"last {n} {unit} trained"


def section(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Markdown describing a CLIP run from its config.json (``clip`` key) and metrics.json."""
    cfg = config.get("clip", {})
    get = cfg.get
    objectives = [f"{k} (weight {get('w_' + k, 0)})" for k in ("contrastive", "itm", "caption")
                  if get("w_" + k, 0) > 0]
    chunk = get("grad_cache_chunk", 0)
    cache = f" (gradient cache chunks of {chunk})" if chunk else ""
    pooling = (
        f"a report = mean of its sentence embeddings (sentence dropout {get('sentence_dropout')})"
        if get("text_pooling") == "sentences"
        else "one embedding per report"
    )
    lines = [
        "## CLIP-style vision-language model",
        "",
        f"- Image tower: `{get('init_from') or get('encoder')}` ({get('spatial_dims')}D, "
        f"{get('in_chans')} channel(s), {get('img_size')}px), {_lock(get('lock_image', -1), 'blocks')}",
        f"- Text tower: `{get('text_path') or get('text_tower')}`, {_lock(get('lock_text', -1), 'layers')}; "
        + pooling,
        f"- Objectives: {', '.join(objectives)}",
    ]
    if get("init_clip"):
        lines.append(f"- Warm start: every weight from the CLIP run `{get('init_clip')}`")
    if metrics.get("stopped_early"):
        lines.append(f"- **Stopped early** at step {metrics.get('steps')} of {metrics.get('total_steps')} "
                     "(time budget): continue with `--resume` (state in `resume/`)")
    if "pairs" in metrics:
        lines.append(f"- Data: `{get('data')}` (split {get('split')}), {metrics['pairs']} image-report "
                     f"pairs, {metrics.get('steps')} steps, batch {get('batch_size')}{cache}")
    if "final_loss" in metrics:
        lines.append(f"- Final training loss {metrics['final_loss']:.4f}, "
                     f"temperature {metrics.get('temperature', float('nan')):.4f}")
    prep = config.get("preprocessing")
    lines.append(
        "- Raw inputs at inference replay the training store's preprocessing (recorded in config.json)"
        if prep else "- Raw inputs at inference: prepared-store defaults at the run's image size"
    )
    lines += [
        "",
        "Files: `model.safetensors` (image tower, `medfm.models.io.load_encoder`), `text/` (Hugging Face",
        "format), `heads.safetensors` (projections, temperature, ITM head), `decoder.safetensors` +",
        "`vocab.json` (report decoder), `metrics.json`, `loss.png`.",
        "",
        "Use: `medfm zeroshot RUN DATA`, `medfm retrieve RUN DATA --query ...`, `medfm report RUN IMAGE`,",
        "`medfm vqa RUN DATA`. Intended use: research. Zero-shot scores and generated reports are not",
        "validated for clinical decisions.",
    ]
    return "\n".join(lines) + "\n"


def _register() -> None:
    """Add the section to medfm.modelcard.SECTIONS (the package imports this module)."""
    try:
        from medfm.modelcard import SECTIONS
    except ImportError:  # card package not assembled yet: the section is still usable directly
        return
    if "clip" not in SECTIONS:
        SECTIONS.register("clip")(section)


_register()
