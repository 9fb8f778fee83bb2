"""Lightning callbacks: atomic checkpoints, an append-only loss history, resume of the data stream,
a per-rank report (which proves every DDP rank trained and stayed in sync) and the data-wait share."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from medfm.train.precision import StepTimer

LAST = "last.ckpt"


class AtomicCheckpoint(L.Callback):
    """Save ``checkpoints/last.ckpt`` every ``every`` optimizer steps and at the end.

    Written to a temporary name, then ``os.replace``d: a kill at any moment leaves the previous complete
    checkpoint in place, never a truncated one.
    """

    def __init__(self, dirpath: str | Path, every: int) -> None:
        self.dirpath = Path(dirpath)
        self.every = every
        self._last_saved = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / LAST

    def save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self._last_saved:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        tmp = self.dirpath / f".{LAST}.tmp"
        trainer.save_checkpoint(tmp)  # every rank must call it (collective); only rank 0 writes
        if trainer.is_global_zero:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.last_path)
        trainer.strategy.barrier("medfm-ckpt")
        self._last_saved = step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)


class ResumeStream(L.Callback):
    """Point the sampler at the data position of the restored step (so a resumed run sees new batches)."""

    def __init__(self, sampler: Any, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sampler.start = trainer.global_step * self.batch_size


class LossHistory(L.Callback):
    """Append (step, loss, lr, images/s, wall time) to ``logs/train.csv`` every ``every`` steps.

    Appending (rather than rewriting) keeps the rows of a killed run; a resumed run adds rows after them.
    Readers keep the last row per step (a resumed run may repeat the steps after its last checkpoint).
    """

    FIELDS = ["step", "loss", "lr", "images_per_s", "elapsed_s", "launch"]

    def __init__(self, path: str | Path, every: int, batch_size: int) -> None:
        self.path = Path(path)
        self.every = every
        self.batch_size = batch_size
        self.t0 = 0.0
        self.steps = 0
        self.first_step_end: float | None = None
        self.launch = 0
        self.last_loss = float("nan")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = time.perf_counter()
        self.start_step = trainer.global_step
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.is_file()
            if not new:
                with open(self.path) as f:
                    self.launch = 1 + max((int(r["launch"]) for r in csv.DictReader(f)), default=-1)
            with open(self.path, "a", newline="") as f:
                if new:
                    csv.writer(f).writerow(self.FIELDS)

    def throughput(self, trainer: L.Trainer) -> float:
        """Images per second over this launch, excluding the first step (startup, worker spawn)."""
        done = trainer.global_step - self.start_step - 1
        if self.first_step_end is None or done <= 0:
            return float("nan")
        return done * self.batch_size * trainer.world_size / (time.perf_counter() - self.first_step_end)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.first_step_end is None:
            self.first_step_end = time.perf_counter()
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.last_loss = float(loss.detach()) if torch.is_tensor(loss) else float("nan")
        step = trainer.global_step
        if not trainer.is_global_zero or (step % self.every and step != trainer.max_steps):
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        row = [
            step,
            f"{self.last_loss:.6g}",
            f"{lr:.6g}",
            f"{self.throughput(trainer):.2f}",
            f"{time.perf_counter() - self.t0:.2f}",
            self.launch,
        ]
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(row)
            f.flush()


def read_history(path: str | Path) -> list[dict[str, float]]:
    """Rows of ``train.csv`` sorted by step, keeping the last row written for each step."""
    p = Path(path)
    if not p.is_file():
        return []
    by_step: dict[int, dict[str, float]] = {}
    with open(p) as f:
        for r in csv.DictReader(f):
            by_step[int(r["step"])] = {k: float(v) for k, v in r.items()}
    return [by_step[s] for s in sorted(by_step)]


class RankReport(L.Callback):
    """Each rank writes ``logs/rank<r>.json``: world size, batches and images it trained on, and a checksum
    of its final weights (equal on all ranks when gradients were synchronised)."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.batches = 0
        self.indices: list[int] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches += 1
        if isinstance(batch, dict) and "index" in batch and len(self.indices) < 100_000:
            self.indices.extend(int(i) for i in batch["index"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            checksum = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        rec = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "batches": self.batches,
            "images": len(self.indices),
            "distinct_images": len(set(self.indices)),
            "first_indices": self.indices[:32],
            "param_checksum": checksum,
            "global_step": trainer.global_step,
        }
        (self.log_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(rec, indent=2))


class DataWait(L.Callback):
    """Per training step, the time waiting for the batch (from one step's ``on_train_batch_end`` to the next
    ``on_train_batch_start``) vs the whole step; ``summary()`` gives ``data_wait_share`` and
    ``step_time_ms`` for metrics.json (train/precision.StepTimer, the same figure as the custom loops)."""

    def __init__(self) -> None:
        self.timer = StepTimer()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.timer.batch_ready()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.timer.step_done()

    def summary(self) -> dict[str, float | None]:
        return self.timer.summary()
