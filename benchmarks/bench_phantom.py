"""Phantom generator speed: ms per case (render only, and render + write) for cxr 256 px and ct3d 64^3.

Writes benchmarks/results/phantom.json. Run: .venv/bin/python benchmarks/bench_phantom.py [--n 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MEDFM_PROGRESS", "0")

from medfm.data.phantom import make_case, write_phantom  # noqa: E402
from medfm.rundir import environment, write_json  # noqa: E402


def _ms_per_case(fn, n: int) -> float:
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    return 1000 * (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "phantom.json"))
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    res: dict[str, object] = {"n": args.n, "env": environment()}
    make_case("cxr", 0, size=256)  # warm caches (fonts, imports)
    res["cxr256_render_ms"] = round(_ms_per_case(lambda i: make_case("cxr", i, size=256), args.n), 1)
    n_ct = max(2, args.n // 2)
    res["ct64_render_ms"] = round(_ms_per_case(lambda i: make_case("ct3d", i, size=64), n_ct), 1)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        write_phantom("cxr", args.n, Path(d) / "cxr", size=256)
        res["cxr256_write_ms"] = round(1000 * (time.perf_counter() - t) / args.n, 1)
        t = time.perf_counter()
        write_phantom("ct3d", max(2, args.n // 2), Path(d) / "ct", size=64)
        res["ct64_write_ms"] = round(1000 * (time.perf_counter() - t) / max(2, args.n // 2), 1)
    res["target"] = "cxr256_render_ms well under 1000 on one core"
    write_json(args.out, res)
    print(res)


if __name__ == "__main__":
    main()
