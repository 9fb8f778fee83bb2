"""Fault tolerance: kill -9 a CLI training run, rerun the same command, and it continues where it stopped."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import torch

from medfm.train.synthetic import write_synthetic_dataset

STEPS = 30


def rows(path):
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def test_kill_and_resume(tmp_path) -> None:
    ds = write_synthetic_dataset(tmp_path / "ds", n=32, size=32)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "medfm.cli.app",
        "pretrain",
        "mae",
        str(ds),
        "--out",
        str(out),
        "--img-size",
        "32",
        "--patch-size",
        "8",
        "--batch-size",
        "16",
        "--steps",
        str(STEPS),
        "--ckpt-every",
        "5",
        "--log-every",
        "1",
        "--workers",
        "0",
        "--encoder-args",
        '{"depth": 2, "embed_dim": 64, "num_heads": 2}',
    ]
    env = {**os.environ, "MEDFM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    history = out / "logs" / "train.csv"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        r = rows(history)
        if r and r[-1]["step"] >= 12:  # past the step-10 checkpoint
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = rows(history)
    killed_at = int(before[-1]["step"])
    assert killed_at < STEPS
    ckpt_step = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert ckpt_step % 5 == 0 and 10 <= ckpt_step <= killed_at
    assert not list((out / "checkpoints").glob("*.tmp")) or (out / "checkpoints" / "last.ckpt").is_file()

    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    met = json.loads((out / "metrics.json").read_text())
    assert met["resumed_from_step"] == ckpt_step and met["steps"] == STEPS
    after = [r for r in rows(history) if r["launch"] == 1]
    assert [int(r["step"]) for r in after] == list(range(ckpt_step + 1, STEPS + 1))
    # The resumed run continues the same curve: the replayed steps reproduce the killed run's losses
    # (same weights, optimizer state, data stream and masking), and later losses stay in the same range.
    pre = {int(r["step"]): r["loss"] for r in before}
    for r in after:
        if int(r["step"]) in pre:
            assert math.isclose(r["loss"], pre[int(r["step"])], rel_tol=1e-3), (r, pre[int(r["step"])])
    assert max(r["loss"] for r in after) <= max(pre.values()) * 1.2
    assert min(r["loss"] for r in after) < pre[1]
    assert (out / "loss_curve.png").is_file()
