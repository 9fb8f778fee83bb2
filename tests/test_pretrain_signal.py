"""SIGTERM / Ctrl-C stop pretraining within a step, with a checkpoint to resume from (issue 16, item 12)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from medfm.train.synthetic import write_synthetic_dataset


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_and_exits_promptly(tmp_path, sig):
    ds = write_synthetic_dataset(tmp_path / "ds", n=16, size=32)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "medfm.cli.app", "pretrain", "mae", str(ds), "--out", str(out),
           "--img-size", "32", "--patch-size", "8", "--steps", "100000", "--batch-size", "4",
           "--workers", "0", "--log-every", "1", "--ckpt-every", "100000",
           "--encoder-args", '{"depth": 1, "embed_dim": 32, "num_heads": 2}']
    env = dict(os.environ, MEDFM_PROGRESS="0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = out / "logs" / "train.csv"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) > 3):  # training is under way
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(sig)
    output = proc.communicate(timeout=60)[0]
    assert time.monotonic() - t0 < 30, "did not stop promptly"
    assert proc.returncode != 0 and f"stopped by {sig.name}" in output, output
    step = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < 100000
    assert not (out / "model.safetensors").exists()  # an interrupted run is not a finished one
