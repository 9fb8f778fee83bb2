"""Peak memory of `medfm data prepare` as the dataset grows: it must stay flat (one shard in memory).

Generates N images (the phantom generator for small N, tiny synthetic PNGs for large N, where rendering
would dominate), runs `medfm data prepare` in a subprocess and samples the RSS of it and all its children
every 20 ms. Results are merged into benchmarks/results/prepare_memory.json (one entry per N).

    .venv/bin/python benchmarks/bench_prepare_memory.py --n 1000 --n 10000
    nohup .venv/bin/python benchmarks/bench_prepare_memory.py --n 100000 &   # long: run in the background
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "prepare_memory.json"


def make_source(root: Path, n: int, size: int, source: str) -> Path:
    """A folder of n images (cached: reused when it already holds n)."""
    d = root / f"{source}_{n}_{size}"
    if (d / "done").exists():
        return d
    if source == "phantom":
        from medfm.data.phantom.generate import write_phantom

        write_phantom("cxr", n, d, size=max(32, size), workers=1)
    else:
        from PIL import Image

        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (size, size), dtype=np.uint8)
        for i in range(n):
            sub = d / f"{i // 1000:04d}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.roll(base, i % size, axis=1)).save(sub / f"img{i:07d}.png", compress_level=1)
    (d / "done").write_text("ok")
    return d


def run_prepare(src: Path, out: Path, size: int, shard_size: int, workers: int, salt: Path) -> dict:
    import psutil

    cmd = [sys.executable, "-c", "from medfm.cli.app import main; main()", "data", "prepare", str(src),
           "--out", str(out), "--size", str(size), "--shard-size", str(shard_size), "--workers", str(workers),
           "--salt-file", str(salt), "--overwrite"]
    env = dict(os.environ, MEDFM_PROGRESS="0")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = psutil.Process(proc.pid)
    peak = peak_main = 0
    while proc.poll() is None:
        try:
            procs = [p, *p.children(recursive=True)]
            rss = [q.memory_info().rss for q in procs]
            peak = max(peak, sum(rss))
            peak_main = max(peak_main, rss[0])
        except psutil.Error:
            pass
        time.sleep(0.02)
    out_text, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed: {err.strip()[-500:]}")
    seconds = time.perf_counter() - t0
    from medfm.data.summary import load_summary

    summary = load_summary(out).to_dict()
    return {"peak_rss_mb_total": round(peak / 2**20, 1), "peak_rss_mb_main": round(peak_main / 2**20, 1),
            "seconds": round(seconds, 1), "cases": summary["n_cases"], "skipped": summary["n_skipped"],
            "cases_per_s": round(summary["n_cases"] / seconds, 1), "output": out_text.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="number of images (repeatable; default 1000)")
    ap.add_argument("--size", type=int, default=64, help="source and output image size")
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--source", default="auto", choices=["auto", "phantom", "synthetic"],
                    help="auto: phantom for n <= 2000, synthetic PNGs above (phantom rendering is slow)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medfm_bench_prepare")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    for n in args.n or [1000]:
        source = args.source if args.source != "auto" else ("phantom" if n <= 2000 else "synthetic")
        t0 = time.perf_counter()
        src = make_source(args.workdir, n, args.size, source)
        gen_s = time.perf_counter() - t0
        r = run_prepare(src, args.workdir / f"prepared_{n}", args.size, args.shard_size, args.workers,
                        args.workdir / "salt")
        r.update(n=n, source=source, size=args.size, shard_size=args.shard_size, workers=args.workers,
                 generate_seconds=round(gen_s, 1), cpu_count=os.cpu_count(),
                 note="measured on a shared machine; rerun for final numbers")
        results["runs"][str(n)] = r
        print(json.dumps(r))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    runs = sorted(results["runs"].values(), key=lambda r: r["n"])
    if len(runs) > 1:
        results["peak_growth_ratio_largest_vs_smallest"] = round(
            runs[-1]["peak_rss_mb_total"] / runs[0]["peak_rss_mb_total"], 2)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
