"""Settings of a CLIP-style run (architecture and training), saved verbatim in config.json."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from medfm.errors import ConfigError


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
    # locking: -1 = train all, 0 = lock the whole tower, N = train only its last N blocks (image tower: its
    # last N Encoder.layer_groups(), the final norm being the last group)
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
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed (checked against the device: train/precision.py)
    compile: bool = False  # torch.compile the towers' forward (eager with one warning if it fails)

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
