"""Run a pretraining objective with Lightning and write the run directory.

``run_pretrain(cfg)`` is the whole pipeline: pooled data -> encoder -> objective -> Lightning Trainer
(DDP/FSDP, mixed precision, atomic checkpoints, CSV + TensorBoard logs) -> run directory (config.json,
model.safetensors, metrics.json, loss_curve.png, figures, README.md). Rerunning the same command on the same
``out`` resumes from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medfm.errors import ConfigError, MedfmError
from medfm.rundir import RunDir, read_json
from medfm.train.callbacks import (
    AtomicCheckpoint,
    DataWait,
    LossHistory,
    RankReport,
    ResumeStream,
    read_history,
)
from medfm.train.config import RESUME_KEYS, PretrainConfig
from medfm.train.datamodule import PooledImages, StreamSampler, make_loader
from medfm.train.objectives import get_objective
from medfm.train.precision import (
    LIGHTNING_ONLY,
    PRECISIONS,
    channels_last,
    compile_function,
    resolve_precision,
)

_OUT_ENV = "MEDFM_PRETRAIN_OUT"  # DDP children re-run the command: they must use the parent's run dir


def resolve_out(cfg: PretrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    inherited = os.environ.get(_OUT_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":  # a DDP child re-running the command
        return Path(inherited)
    out = Path("runs") / f"{cfg.objective}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    os.environ[_OUT_ENV] = str(out)
    return out


def _progress_bar_class() -> type:
    from lightning.pytorch.callbacks import TQDMProgressBar

    class ProgressBar(TQDMProgressBar):
        """tqdm bar showing loss and step, without Lightning's logger version number."""

        def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
            items = super().get_metrics(trainer, pl_module)
            items.pop("v_num", None)
            return items

    return ProgressBar


def _parse_devices(devices: str) -> Any:
    if devices == "auto":
        return "auto"
    try:
        return int(devices)
    except ValueError:
        return devices  # e.g. "0,1"


def build_trainer(
    cfg: PretrainConfig, run_dir: Path, callbacks: list[L.Callback], progress: bool = True
) -> L.Trainer:
    """A Lightning Trainer for step-based pretraining with our loggers and checkpointing."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    logs = run_dir / "logs"
    loggers = [
        CSVLogger(logs, name="", version="csv", flush_logs_every_n_steps=cfg.log_every),
        TensorBoardLogger(logs, name="", version="tensorboard", default_hp_metric=False),
    ]
    cbs = list(callbacks) + [LearningRateMonitor(logging_interval="step")]
    _ProgressBar = _progress_bar_class()
    if progress:
        cbs.append(_ProgressBar(refresh_rate=max(1, min(cfg.log_every, 10))))
    strategy: Any = cfg.strategy
    if cfg.strategy == "ddp" and cfg.accelerator == "cpu":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    try:
        return L.Trainer(
            accelerator=cfg.accelerator,
            devices=_parse_devices(cfg.devices),
            num_nodes=cfg.num_nodes,
            strategy=strategy,
            precision=cfg.precision,
            max_steps=cfg.steps,
            max_epochs=-1,
            logger=loggers,
            callbacks=cbs,
            log_every_n_steps=cfg.log_every,
            gradient_clip_val=cfg.grad_clip or None,
            enable_checkpointing=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,  # our StreamSampler splits the stream across ranks itself
            default_root_dir=str(run_dir),
        )
    except (ValueError, RuntimeError, TypeError) as e:
        raise ConfigError(
            f"cannot set up training with accelerator={cfg.accelerator} devices={cfg.devices} "
            f"strategy={cfg.strategy} precision={cfg.precision}: {e}"
        ) from None


def build_encoder(cfg: PretrainConfig, in_chans: int) -> torch.nn.Module:
    from medfm.models.registry import create_encoder

    kw = dict(spatial_dims=cfg.spatial_dims, in_chans=in_chans, img_size=cfg.img_size, **cfg.encoder_kwargs)
    try:
        return create_encoder(cfg.encoder, patch_size=cfg.patch_size, **kw)
    except ConfigError as e:
        if "patch_size" not in str(e):
            raise
        return create_encoder(cfg.encoder, **kw)  # CNN encoders have no patch size


def _check_resume(run_dir: Path, cfg: PretrainConfig) -> None:
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        return
    old = read_json(cfg_path).get("pretrain", {})
    diff = [k for k in RESUME_KEYS if k in old and old[k] != getattr(cfg, k)]
    if diff:
        show = ", ".join(f"{k}: {old[k]} -> {getattr(cfg, k)}" for k in diff)
        raise ConfigError(
            f"{run_dir} holds a checkpoint of a different run ({show}); use another --out or --no-resume"
        )


def _distinct(manifest: Any, col: str) -> list[str]:
    """Distinct non-empty values of a manifest column (prepare stores a missing id as "")."""
    if col not in manifest.columns:
        return []
    return sorted({str(v) for v in manifest[col] if isinstance(v, str) and v and v != "nan"})


def _data_summary(data: PooledImages) -> list[dict[str, Any]]:
    out = []
    for p in data.parts:
        pids = _distinct(p.manifest, "patient_id")
        out.append(
            {
                "path": str(p.root.resolve()),
                "split": p.manifest["split"].iloc[0] if len(p) else None,
                "images": len(p),
                # None = no patient ids at all: the card says "unknown", never "1" (issue 16)
                "patients": len(pids) or None,
                "sites": _distinct(p.manifest, "site"),
                "format_version": p.summary.get("format_version"),
            }
        )
    return out


def _preprocessing(data: PooledImages) -> dict[str, Any] | None:
    """What prepare did to the training images, for inference on raw files to replay (first store's)."""
    try:
        from medfm.data.preprocess import preprocessing_of
    except ImportError:  # older tree without the replay module: keep the store's recorded settings
        return data.parts[0].summary.get("settings") if data.parts else None
    specs = [preprocessing_of(p.root) for p in data.parts]
    if any(s != specs[0] for s in specs[1:]):
        warnings.warn("the pooled datasets were prepared differently; recording the first one's "
                      "preprocessing", stacklevel=2)
    return specs[0] if specs else None


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Experiment logs directory.*")
    warnings.filterwarnings("ignore", message=".*is not a valid bool.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # We resume the data stream ourselves (StreamSampler + ResumeStream): Lightning's caveat does not apply.
    warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")


class StoppedBySignal(MedfmError):
    """Training was stopped by SIGTERM / Ctrl-C after checkpointing; rerunning the command resumes."""


class _StopOnSignal(L.Callback):
    """SIGTERM or Ctrl-C: finish the current step, save the checkpoint, stop.

    Lightning's own SIGTERM handling raises SystemExit(None) mid-loop (exit status 0, no checkpoint), and
    without it a stop request waited for the end of the run's single epoch (issue 16, item 12); so this
    callback takes the signals over once training starts.
    """

    def __init__(self, ckpt: AtomicCheckpoint) -> None:
        self.ckpt = ckpt
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            old = signal.signal(sig, self._handle)
            self._old.setdefault(sig, old)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.install()  # again: Lightning put its own SIGTERM handler in place when fit started

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the step
        self.signum = signum

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        local = self.signum is not None or bool(getattr(trainer, "received_sigterm", False))
        # every rank must agree (the checkpoint is a collective)
        if trainer.strategy.reduce_boolean_decision(local, all=False):
            self.signum = self.signum or signal.SIGTERM
            self.ckpt.save(trainer)
            trainer.should_stop = True


def run_pretrain(cfg: PretrainConfig, resume: bool = True, progress: bool | None = None) -> Path:
    """Pretrain an encoder; returns the run directory (on every rank)."""
    if progress is None:
        progress = os.environ.get("MEDFM_PROGRESS", "1") != "0"
    _quiet_lightning()
    run_dir = resolve_out(cfg)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if last.is_file() and resume:
        _check_resume(run_dir, cfg)
    elif last.is_file() and not resume:
        raise ConfigError(f"{run_dir} already holds a run; remove it or drop --no-resume to continue it")
    # a precision this device cannot run is a one-line error now, not a Lightning traceback mid-setup
    resolve_precision(cfg.precision, cfg.accelerator, PRECISIONS + LIGHTNING_ONLY)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = PooledImages(cfg.data, cfg.split)
    if data.spatial_dims != cfg.spatial_dims:
        raise ConfigError(
            f"the data holds {data.spatial_dims}D images but --spatial-dims is {cfg.spatial_dims}"
        )
    encoder = build_encoder(cfg, data.channels)
    if cfg.channels_last:
        channels_last(encoder)
    objective = get_objective(cfg.objective)(encoder, cfg)
    # compile the loss (MAE calls the encoder through its token API, not forward); state-dict keys unchanged
    objective.compute_loss = compile_function(objective.compute_loss, cfg.compile, f"{cfg.objective} loss")
    objective.run_dir = run_dir
    train_ds = objective.make_dataset(data)

    t_start = time.perf_counter()
    history = LossHistory(run_dir / "logs" / "train.csv", cfg.log_every, cfg.batch_size)
    ckpt = AtomicCheckpoint(ckpt_dir, cfg.ckpt_every)
    placeholder = StreamSampler(len(train_ds), cfg.steps * cfg.batch_size, cfg.seed)
    resume_cb = ResumeStream(placeholder, cfg.batch_size)
    stop = _StopOnSignal(ckpt)
    wait = DataWait()
    trainer = build_trainer(
        cfg, run_dir, [ckpt, history, resume_cb, RankReport(run_dir / "logs"), stop, wait], progress
    )
    # Rank and world size are known once the Trainer exists; give this rank its slice of the stream.
    sampler = StreamSampler(
        len(train_ds), cfg.steps * cfg.batch_size, cfg.seed, trainer.global_rank, trainer.world_size
    )
    resume_cb.sampler = sampler
    loader = make_loader(
        train_ds,
        sampler,
        cfg.batch_size,
        cfg.workers,
        pin_memory=torch.cuda.is_available() and cfg.accelerator != "cpu",
    )

    run = RunDir(run_dir, kind="encoder")
    config = {
        "pretrain": cfg.to_dict(),
        "encoder": dict(encoder.config),
        "data": _data_summary(data),
        "preprocessing": _preprocessing(data),
        "n_params": {
            "encoder": sum(p.numel() for p in encoder.parameters()),
            "total": sum(p.numel() for p in objective.parameters()),
        },
    }
    if trainer.is_global_zero:
        run.write_config(config)

    resumed_from = None
    if last.is_file() and resume:
        resumed_from = int(torch.load(last, map_location="cpu", weights_only=True).get("global_step", 0))
    stop.install()
    try:
        trainer.fit(
            objective,
            train_dataloaders=loader,
            ckpt_path=str(last) if resumed_from is not None else None,
            weights_only=True,
        )
    finally:
        stop.uninstall()
    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        raise StoppedBySignal(
            f"{run_dir}: stopped by {name} at step {trainer.global_step}/{cfg.steps}; checkpoint saved "
            "(run the same command again to resume)"
        )

    if trainer.is_global_zero:
        finish_run(
            run_dir,
            objective,
            train_ds,
            trainer,
            history,
            config,
            resumed_from,
            time.perf_counter() - t_start,
            wait.summary(),
        )
    return run_dir


def finish_run(
    run_dir: Path,
    objective: Any,
    dataset: Any,
    trainer: L.Trainer,
    history: LossHistory,
    config: dict[str, Any],
    resumed_from: int | None,
    wall: float,
    speed: dict[str, Any] | None = None,
) -> None:
    """Encoder weights, figures, metrics.json, loss curve and model card (rank 0 only)."""
    from medfm.modelcard.plots import plot_loss_curve
    from medfm.models.io import save_encoder

    encoder = objective.encoder.float().cpu().eval()
    save_encoder(encoder, run_dir)
    objective.float().cpu()
    rows = read_history(run_dir / "logs" / "train.csv")
    tail = [r["loss"] for r in rows[-5:]]
    metrics = {
        "objective": objective.name,
        "steps": int(trainer.global_step),
        "final_loss": history.last_loss,
        "final_loss_avg5": sum(tail) / len(tail) if tail else None,
        "first_loss": rows[0]["loss"] if rows else None,
        "images_per_s": history.throughput(trainer),
        "wall_time_s": wall,
        "world_size": trainer.world_size,
        "resumed_from_step": resumed_from,
        "images_seen": int(trainer.global_step) * objective.cfg.batch_size * trainer.world_size,
        "precision": objective.cfg.precision,
        "compile": objective.cfg.compile,
        **(speed or {"data_wait_share": None, "step_time_ms": None}),
    }
    run = RunDir(run_dir, kind="encoder")
    run.write_metrics(metrics, merge=False)
    plot_loss_curve(
        run_dir / "logs" / "train.csv",
        run_dir / "loss_curve.png",
        f"{objective.name} / {config['encoder']['name']}",
    )
    try:
        objective.save_figures(run_dir, dataset)
    except Exception as e:  # a figure must never lose a finished training run
        warnings.warn(f"could not save figures: {e}", stacklevel=1)
    run.write_card()
