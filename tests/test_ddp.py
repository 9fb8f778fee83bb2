"""Two-process DDP on CPU (gloo): both ranks train on different data and end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from medfm.train.synthetic import write_synthetic_dataset


def test_ddp_two_cpu_processes(tmp_path) -> None:
    ds = write_synthetic_dataset(tmp_path / "ds", n=16, size=16)
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
        "16",
        "--patch-size",
        "8",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--workers",
        "0",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--log-every",
        "1",
        "--encoder-args",
        '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
    ]
    env = {**os.environ, "MEDFM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    env.pop("MEDFM_PRETRAIN_OUT", None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((out / "logs" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["batches"] == 3 and r["global_step"] == 3 for r in ranks)
    assert all(r["images"] == 12 for r in ranks)
    assert ranks[0]["first_indices"] != ranks[1]["first_indices"]  # each rank got its own slice of data
    # gradients were averaged: both replicas hold the same weights
    c0, c1 = ranks[0]["param_checksum"], ranks[1]["param_checksum"]
    assert abs(c0 - c1) < 1e-6 * max(1.0, abs(c0))
    met = json.loads((out / "metrics.json").read_text())
    assert met["world_size"] == 2 and met["steps"] == 3 and met["images_seen"] == 24
