"""Pretraining settings as data: one dataclass, saved verbatim in the run directory's config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from medfm.errors import ConfigError


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; defaults are a sensible small-hospital starting point."""

    objective: str = "mae"
    data: list[str] = field(default_factory=list)  # prepared dataset directories, pooled
    split: str | None = "train"
    out: str = ""
    # encoder
    encoder: str = "vit_tiny"
    spatial_dims: int = 2
    img_size: int = 64
    patch_size: int = 8
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # extra overrides, e.g. {"depth": 2}
    # optimisation
    batch_size: int = 64
    steps: int = 1000
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int | None = None  # None: 5% of steps
    grad_clip: float = 1.0
    seed: int = 0
    # MAE
    mask_ratio: float = 0.75
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix: bool = True
    recon_every: int = 0  # also save reconstruction figures every N steps (0: only at the end)
    # contrastive
    positives: str = "augment"  # augment | patient | study
    temperature: float = 0.1
    proj_dim: int = 128
    proj_hidden: int = 512
    flip: bool = False
    # hardware / scale-out
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed (checked against the device by train/precision.py)
    compile: bool = False  # torch.compile the objective's loss (eager with one warning if it fails)
    channels_last: bool = False  # channels-last memory format for CNN encoders (no effect on ViTs)
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    workers: int = 0
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    # bookkeeping
    ckpt_every: int = 100
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"--spatial-dims must be 2 or 3, got {self.spatial_dims}")
        if self.img_size < 8:
            raise ConfigError(f"--img-size must be at least 8, got {self.img_size}")
        if self.batch_size < 2:
            raise ConfigError(f"--batch-size must be at least 2, got {self.batch_size}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be positive, got {self.steps}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if self.positives not in ("augment", "patient", "study"):
            raise ConfigError(f"--positives must be augment, patient or study, got '{self.positives}'")
        if self.precision not in ("32", "bf16-mixed", "16-mixed", "bf16-true", "64"):
            raise ConfigError(f"--precision must be 32, bf16-mixed or 16-mixed, got '{self.precision}'")
        if self.ckpt_every < 1 or self.log_every < 1:
            raise ConfigError("--ckpt-every and --log-every must be positive")
        if self.workers < 0 or self.threads < 0:
            raise ConfigError(f"--workers and --threads must be >= 0, got {self.workers}, {self.threads}")
        if self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")

    @property
    def size(self) -> tuple[int, ...]:
        return (self.img_size,) * self.spatial_dims

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Settings that must match for a rerun to resume an existing checkpoint (others, e.g. steps, may change).
RESUME_KEYS = (
    "objective",
    "encoder",
    "spatial_dims",
    "img_size",
    "patch_size",
    "encoder_kwargs",
    "decoder_dim",
    "decoder_depth",
    "decoder_heads",
    "proj_dim",
    "proj_hidden",
    "batch_size",
)
