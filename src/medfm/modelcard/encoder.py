"""Model card section of pretrained encoders (``medfm pretrain``)."""

from __future__ import annotations

from typing import Any

from medfm.modelcard.common import SECTIONS, fmt


@SECTIONS.register("encoder")
def section(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Encoder architecture, objective, training settings and result."""
    enc = config.get("encoder") or {}
    if "imported" in config:
        def short(v: Any) -> str:  # a nested library config (hf_config): its type, not 60 fields
            return f"<{v.get('model_type', 'config')}>" if isinstance(v, dict) else fmt(v)

        args = ", ".join(f"{k}={short(v)}" for k, v in enc.items() if k != "name")
        checks = "".join(f"- {k}: {fmt(v)}\n" for k, v in metrics.items())
        return (f"## Encoder\n`{enc.get('name', '?')}` ({args})\n\n"
                + (f"## Import checks\n{checks}" if checks else ""))
    cfg = config.get("pretrain") or {}
    obj = cfg.get("objective", "?")
    enc_args = ", ".join(f"{k}={fmt(v)}" for k, v in enc.items() if k != "name")
    if obj == "mae":
        detail = (f"mask ratio {cfg.get('mask_ratio')}, decoder {cfg.get('decoder_dim')}x"
                  f"{cfg.get('decoder_depth')}, norm-pix {cfg.get('norm_pix')}")
    else:
        detail = (f"positives = {cfg.get('positives')}, temperature {cfg.get('temperature')}, projection "
                  f"{cfg.get('proj_hidden')}->{cfg.get('proj_dim')}")
    crops = " crops" if cfg.get("spatial_dims") == 3 else ""
    return f"""Self-supervised pretraining with `medfm pretrain {obj}`. No labels were used.

## Encoder
`{enc.get("name", "?")}` ({enc_args})

## Objective
{obj}: {detail}. Input {cfg.get("spatial_dims")}D, {cfg.get("img_size")} px{crops}.

## Training
{metrics.get("steps")} steps, batch {cfg.get("batch_size")} x {metrics.get("world_size", 1)} device(s),
AdamW lr {cfg.get("lr")} (warmup + cosine), weight decay {cfg.get("weight_decay")}, precision
{cfg.get("precision")}{", torch.compile" if cfg.get("compile") else ""}, seed {cfg.get("seed")}.
Final loss **{fmt(metrics.get("final_loss"))}**; {fmt(metrics.get("images_per_s"))} images/s;
wall time {fmt(metrics.get("wall_time_s"))} s{_speed(metrics)}.

The encoder alone also loads with `medfm.load_encoder(run)` (its config travels in the safetensors header);
`encoder(images)` gives (B, {enc.get("embed_dim", "D")}) pooled embeddings.
"""


def _speed(metrics: dict) -> str:
    """", 12.3 ms/step, 8% waiting for data" when the run measured it (older runs did not)."""
    from medfm.train.precision import describe_speed

    line = describe_speed(metrics)
    return f", {line}" if line else ""
