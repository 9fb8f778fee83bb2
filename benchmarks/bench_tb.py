"""Tuberculosis (Shenzhen + Montgomery CXR) label efficiency with the same MAE encoder as bench_breastmnist.

Uses the fixed split of ../shared/data/cxr_lung_seg/manifest.csv (label: tuberculosis). Writes
benchmarks/results/tb_label_efficiency.{json,md}. Run bench_breastmnist.py first (it pretrains the encoder
on the shared unlabelled pool), or this script pretrains it.

    .venv/bin/python benchmarks/bench_tb.py [--work runs/h6bench] [--seeds 3]

Same training options as bench_breastmnist.py (--epochs, --min-steps, --max-steps, --patience,
--trained-seeds).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

try:  # run as a script: benchmarks/ is on sys.path
    import label_efficiency as bench
except ImportError:  # pragma: no cover - imported as benchmarks.<name> from the repo root
    from benchmarks import label_efficiency as bench

try:  # run as a script from the repo root: benchmarks/ is not a package
    from bench_breastmnist import adapt_overrides, add_common_args, describe_encoder, pool_and_pretrain
except ImportError:  # pragma: no cover
    from benchmarks.bench_breastmnist import (
        adapt_overrides,
        add_common_args,
        describe_encoder,
        pool_and_pretrain,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MEDFM_PROGRESS", "0")
    t0 = time.perf_counter()
    run = args.encoder_run or pool_and_pretrain(args.work, args.size, args.patch, args.steps)
    data = args.work / f"cxr_lung_seg_{args.size}"
    res = bench.label_efficiency_split(run, data, args.work / "adapt_tb", args.methods.split(","),
                                       args.fractions, args.shots, args.seeds,
                                       args.trained_seeds or args.seeds,
                                       args.adapt_steps, epochs=args.epochs, min_steps=args.min_steps,
                                       max_steps=args.max_steps, patience=args.patience,
                                       **adapt_overrides(args))
    wall = time.perf_counter() - t0
    recipe = bench.recipe(args.adapt_steps, args.epochs, args.min_steps, args.max_steps, args.patience,
                          **adapt_overrides(args))
    meta = {"description": f"Shenzhen + Montgomery TB CXR ({args.size} px), fixed split 492/70/142; "
                           f"{describe_encoder(run, args.steps)}; "
                           f"{recipe}; {args.seeds} seeds (finetune/lora/scratch: "
                           f"{args.trained_seeds or args.seeds}).",
            "encoder_run": str(run), "data": str(data), "wall_s": round(wall, 1), "threads": args.threads,
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared with other jobs: timings noisy)"}
    js, md = bench.write_results("tb_label_efficiency", res, Path("benchmarks/results"), meta)
    print(md.read_text())
    print(f"wrote {js}")


if __name__ == "__main__":
    main()
