"""Load test of `medfm serve` on loopback: C concurrent clients posting real chest X-rays (PNG, 256 px) to
/v1/classify for D seconds, once with micro-batching off (--max-batch 1) and once on (--max-batch 16), each
against a fresh server process (`medfm serve`, 2 torch threads). Reports requests/s, p50/p95/p99 latency,
errors, the mean micro-batch size (from /metrics) and the server's resident memory sampled every 5 s (first
vs last quarter of the samples after a 10 s warm-up: flat or growing).
Writes benchmarks/results/serve_load.{json,md}.

    .venv/bin/python benchmarks/bench_serve.py [--clients 8] [--seconds 120] [--size 224] [--width 64]

The classifier is a ResNet-18 linear probe on the TB chest X-rays (accuracy is not the point here; the
model size and input size are); it is cached under benchmarks/work/serve/ (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MEDFM_PROGRESS", "0")

from medfm.paths import shared_data_dir  # noqa: E402
from medfm.rundir import environment, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "work" / "serve"
MEDFM = Path(sys.executable).parent / "medfm"


def build_model(size: int, width: int) -> Path:
    import pandas as pd
    import torch

    from medfm.data.prepare import PrepareConfig, prepare
    from medfm.models.registry import create_encoder
    from medfm.tasks.adapt import fit_classifier

    run = WORK / f"tb_resnet18_w{width}_{size}"
    if (run / "config.json").is_file():
        return run
    cxr = shared_data_dir() / "cxr_lung_seg"
    m = pd.read_csv(cxr / "manifest.csv").groupby("split").head(60)
    m = m.assign(image=[str(cxr / p) for p in m.image])[["image", "tuberculosis", "split"]]
    WORK.mkdir(parents=True, exist_ok=True)
    m.to_csv(WORK / "manifest.csv", index=False)
    store = WORK / f"prepared_{size}"
    if not (store / "summary.json").is_file():
        prepare(WORK / "manifest.csv", store, PrepareConfig(size=size, labels=["tuberculosis"],
                                                            allow_outside=[str(cxr)]), progress=False)
    torch.manual_seed(0)
    fit_classifier(create_encoder("resnet18", img_size=size, width=width), store, run, method="linear")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(run: Path, tokens: Path, port: int, max_batch: int) -> subprocess.Popen:
    cmd = [str(MEDFM), "serve", str(run), "--port", str(port), "--tokens", str(tokens),
           "--max-batch", str(max_batch), "--max-wait-ms", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="2", MEDFM_PROGRESS="0")
    # The server logs one line per request: to a file, never to an unread pipe (a full pipe blocks it).
    log = open(WORK / f"server-{port}.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)


def wait_ready(url: str, token: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; see {WORK}/server-*.log")
        try:
            if httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {token}"}, timeout=2).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not come up")


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    return int(m.group(1)) * 1024 if m else 0


async def load(url: str, token: str, images: list[bytes], clients: int, seconds: float, pid: int
               ) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    rss: list[tuple[float, int]] = []
    t_end = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {token}"}

    async def client(k: int) -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            i = k
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                try:
                    r = await c.post(f"{url}/v1/classify", headers=headers,
                                     files={"file": ("x.png", images[i % len(images)], "image/png")})
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:100]}")
                    else:
                        lat.append(time.perf_counter() - t0)
                except httpx.HTTPError as e:
                    errors.append(type(e).__name__)
                i += clients

    async def sample() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() < t_end:
            rss.append((time.perf_counter() - t0, rss_of(pid)))
            await asyncio.sleep(5)

    t0 = time.perf_counter()
    await asyncio.gather(sample(), *(client(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1000
    warm = [r for t, r in rss if t >= 10.0] or [r for _, r in rss]  # the first seconds load the model
    q = max(1, len(warm) // 4)
    first, last = np.mean(warm[:q]), np.mean(warm[-q:])
    return {"requests": len(lat), "errors": len(errors), "error_examples": errors[:5],
            "requests_per_s": round(len(lat) / wall, 2), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p95_ms": round(float(np.percentile(a, 95)), 1), "p99_ms": round(float(np.percentile(a, 99)), 1),
            "rss_mib_first_quarter": round(first / 2**20, 1), "rss_mib_last_quarter": round(last / 2**20, 1),
            "rss_growth_pct": round(100 * (last - first) / first, 2), "rss_samples_mib":
                [round(r / 2**20, 1) for _, r in rss]}


def mean_batch(url: str, token: str) -> float | None:
    import httpx

    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    s = re.search(r"^medfm_batch_size_sum ([\d.e+]+)$", text, re.M)
    n = re.search(r"^medfm_batch_size_count ([\d.e+]+)$", text, re.M)
    return round(float(s.group(1)) / float(n.group(1)), 2) if s and n and float(n.group(1)) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--out", default=str(RESULTS / "serve_load"))
    args = ap.parse_args()
    from medfm.serve.auth import make_token_entry

    run = build_model(args.size, args.width)
    token, entry = make_token_entry("bench", ["read"])
    tokens = WORK / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [entry]}))
    cxr = shared_data_dir() / "cxr_lung_seg"
    import pandas as pd

    images = [(cxr / p).read_bytes() for p in pd.read_csv(cxr / "manifest.csv").image.head(32)]
    rows = {}
    for label, mb in (("no micro-batching", 1), ("micro-batching (max 16, 5 ms)", 16)):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(run, tokens, port, mb)
        try:
            wait_ready(url, token, proc)
            res = asyncio.run(load(url, token, images, args.clients, args.seconds, proc.pid))
            res["mean_batch"] = mean_batch(url, token)
            res["max_batch"] = mb
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        rows[label] = res
        print(label, {k: v for k, v in res.items() if k != "rss_samples_mib"}, flush=True)
    base, mbr = rows["no micro-batching"], rows["micro-batching (max 16, 5 ms)"]
    out = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
           "clients": args.clients, "seconds": args.seconds, "model": f"resnet18 width {args.width}",
           "input": f"256x256 PNG chest X-ray -> {args.size} px", "runs": rows,
           "speedup_rps": round(mbr["requests_per_s"] / base["requests_per_s"], 2),
           "environment": environment()}
    write_json(Path(args.out).with_suffix(".json"), out)
    lines = [f"# `medfm serve` load test ({args.clients} clients, {args.seconds:g} s each, loopback)", "",
             f"`{out['command']}`", "",
             f"Model: {out['model']}, input {out['input']}; server torch 2 threads.", "",
             "| run | requests/s | p50 ms | p95 ms | p99 ms | errors | mean batch | "
             "RSS first→last quarter after 10 s warm-up, MiB |", "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                     f"{r['errors']} | {r['mean_batch']} | {r['rss_mib_first_quarter']} → "
                     f"{r['rss_mib_last_quarter']} ({r['rss_growth_pct']:+.1f} %) |")
    lines += ["", f"Micro-batching throughput ratio: {out['speedup_rps']}×"]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
