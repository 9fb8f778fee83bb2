"""CLIP training throughput (pairs/s) and peak memory, plain vs gradient-cached large batches
-> benchmarks/results/clip.json.

Each configuration runs in a fresh subprocess so its peak memory is its own: on CUDA the allocator's peak
(``torch.cuda.max_memory_allocated``), on CPU the process's peak resident set size (ru_maxrss, which also
counts the libraries — compare the differences between rows). Model: ViT (patch 8, depth 4) on 64 px images +
the bundled MiniLM text tower with its last 2 layers trained, random image-report pairs.

    .venv/bin/python benchmarks/bench_clip.py --batch 64 --chunk 16 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "clip.json"


def worker(batch: int, chunk: int, steps: int, threads: int, device: str, precision: str = "32") -> dict:
    import resource

    import torch

    from medfm.train.clip import ClipConfig, build_clip, train_step
    from medfm.train.precision import resolve_precision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    cfg = ClipConfig(
        img_size=64,
        encoder_kwargs={"patch_size": 8, "depth": 4},
        lock_text=2,
        grad_cache_chunk=chunk,
        batch_size=batch,
    )
    model = build_clip(cfg).to(dev).train()
    words = "no pleural effusion small right pneumothorax nodule heart size is normal consolidation".split()
    g = torch.Generator().manual_seed(0)
    texts = [
        " ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=g))
        for _ in range(batch)
    ]
    tok = model.text.tokenize(texts)
    ids, mask = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
    x = torch.rand(batch, 1, 64, 64, generator=g).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    prec = resolve_precision(precision, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        rec = train_step(model, x, texts, ids, mask, None, prec=prec)
        opt.step()
        return rec["loss"]

    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    secs = time.perf_counter() - t0
    out = {
        "batch": batch,
        "grad_cache_chunk": chunk,
        "precision": precision,
        "steps": steps,
        "pairs_per_s": round(batch * steps / secs, 2),
        "seconds_per_step": round(secs / steps, 3),
        "final_loss": round(loss, 4),
        "device": str(dev),
        "threads": threads,
    }
    if dev.type == "cuda":
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    else:
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16, help="Gradient-cache chunk size for the cached run.")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu")
    p.add_argument("--precisions", default="32,bf16-mixed", help="each configuration in each of these")
    p.add_argument("--out", default=str(RESULTS), help="where the JSON goes")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        b, c, prec = a.worker.split(",")
        print(json.dumps(worker(int(b), int(c), a.steps, a.threads, a.device, prec)))
        return
    rows = []
    small = max(2, a.chunk)
    precs = [x.strip() for x in a.precisions.split(",") if x.strip()]
    shapes = [(small, 0), (a.batch, 0), (a.batch, a.chunk)]
    for b, c, prec in [(b, c, prec) for prec in precs for b, c in shapes]:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            f"{b},{c},{prec}",
            "--steps",
            str(a.steps),
            "--threads",
            str(a.threads),
            "--device",
            a.device,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/bench_clip.py " + " ".join(sys.argv[1:]),
                "rows": rows,
                "bf16_vs_fp32_pairs_per_s": {
                    f"batch {r['batch']} chunk {r['grad_cache_chunk']}": r["pairs_per_s"] / f["pairs_per_s"]
                    for r in rows if r["precision"] == "bf16-mixed"
                    for f in rows if f["precision"] == "32" and (f["batch"], f["grad_cache_chunk"])
                    == (r["batch"], r["grad_cache_chunk"])
                },
                "note": "rows: small plain batch, large plain batch, large batch "
                "with gradient cache (same loss as the large plain batch, memory of ~one chunk "
                "of activations); CPU timings taken on a shared machine",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
