"""bf16-mixed vs fp32 MAE training: do the loss curves agree within noise?

Three medfm MAE runs on the same prepared phantom chest X-rays (ViT-Tiny 192 x 12, 64 px, patch 8, mask 0.75,
batch 64, decoder 128 x 2, AdamW with warmup + cosine): fp32 with seed 0, fp32 with seed 1 (the noise
reference: same recipe, other batches and masks) and bf16-mixed with seed 0 (the same batches and masks as
fp32 seed 0). They run interleaved step by step in one process, so their step times are comparable too.
"Within noise" means the bf16 curve is no further from fp32 seed 0 than fp32 seed 1 is.

    .venv/bin/python benchmarks/bench_precision_curves.py [--steps 500] [--threads 2]

Writes benchmarks/results/precision_curves.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "work" / "precision_curves"


def train_images(n_cases: int, size: int) -> torch.Tensor:
    """The training split of a prepared phantom CXR set (prepared once, cached under benchmarks/work)."""
    from medfm.data.phantom import write_phantom
    from medfm.data.prepare import PrepareConfig, prepare
    from medfm.data.store import PreparedDataset

    prepared = WORK / "prepared"
    if not (prepared / "summary.json").is_file():
        write_phantom("cxr", n_cases, WORK / "phantom", size=128)
        prepare(WORK / "phantom", prepared, PrepareConfig(size=size), progress=False)
    ds = PreparedDataset(prepared, split="train")
    return torch.stack([ds[i]["image"].float() for i in range(len(ds))])


def build(seed: int):
    from medfm.models.registry import create_encoder
    from medfm.train.mae import MAE

    torch.manual_seed(seed)
    enc = create_encoder("vit_tiny", spatial_dims=2, in_chans=1, img_size=64, patch_size=8,
                         embed_dim=192, depth=12, num_heads=3)
    return MAE(enc, decoder_dim=128, decoder_depth=2, decoder_heads=4, mask_ratio=0.75, norm_pix=True)


def smooth(x: list[float], k: int = 25) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    return np.convolve(a, np.ones(k) / k, mode="valid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-4 * 64 / 256 * 4)
    ap.add_argument("--n-cases", type=int, default=600)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    images = train_images(a.n_cases, 64)
    runs = {"fp32 seed 0": ("fp32", 0), "fp32 seed 1": ("fp32", 1), "bf16 seed 0": ("bf16", 0)}
    state = {}
    for name, (prec, seed) in runs.items():
        model = build(0).train()  # one initialisation: only batches, masks and precision differ
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.05)
        warm = max(1, a.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s, w=warm: min(1.0, (s + 1) / w) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, max(0, s - w) / max(1, a.steps - w)))))
        gen = torch.Generator().manual_seed(seed)
        state[name] = dict(model=model, opt=opt, sched=sched, gen=gen, prec=prec, loss=[], t=[])
    for step in range(a.steps):
        for s in state.values():
            idx = torch.randint(0, len(images), (a.batch_size,), generator=s["gen"])
            x = images[idx]
            t0 = time.perf_counter()
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if s["prec"] == "bf16" else nullcontext()
            with ctx:
                loss = s["model"].loss(x, s["gen"])
            s["opt"].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(s["model"].parameters(), 1.0)
            s["opt"].step()
            s["sched"].step()
            s["t"].append(time.perf_counter() - t0)
            s["loss"].append(float(loss))
        if step % 50 == 0:
            losses = ", ".join(f"{n} {s['loss'][-1]:.4f}" for n, s in state.items())
            print(f"step {step}: {losses}", flush=True)
    tail = max(25, a.steps // 5)  # the last fifth of training
    sm = {n: smooth(s["loss"]) for n, s in state.items()}
    ref = sm["fp32 seed 0"]
    gap = {n: float(np.mean(np.abs(v[-tail:] - ref[-tail:]))) for n, v in sm.items() if n != "fp32 seed 0"}
    final = {n: float(np.mean(s["loss"][-tail:])) for n, s in state.items()}
    step_ms = {n: 1000 * statistics.median(s["t"][5:]) for n, s in state.items()}
    out = {
        "benchmark": "precision_curves",
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "config": vars(a) | {"model": "MAE ViT-Tiny 192x12, 64 px, patch 8, mask 0.75, decoder 128x2"},
        "final_loss_last_fifth": final,
        "mean_abs_gap_to_fp32_seed0_last_fifth": gap,
        "bf16_within_noise": gap["bf16 seed 0"] <= gap["fp32 seed 1"] * 1.5,
        "step_ms_median": step_ms,
        "bf16_speedup": step_ms["fp32 seed 0"] / step_ms["bf16 seed 0"],
        "losses": {n: [round(v, 5) for v in s["loss"]] for n, s in state.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "precision_curves.json").write_text(json.dumps(out, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n, v in sm.items():
        ax.plot(np.arange(len(v)) + 12, v, label=n, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("MAE loss (moving average of 25)")
    ax.set_title("medfm MAE, bf16-mixed vs fp32 (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "precision_curves.png", dpi=110)
    md = [
        "# bf16-mixed vs fp32 MAE loss curves",
        "",
        f"`{out['command']}`",
        "",
        "| run | loss, last fifth | mean gap to fp32 seed 0 (smoothed) | median step ms |",
        "|---|---|---|---|",
    ]
    for n in state:
        md.append(f"| {n} | {final[n]:.4f} | {gap.get(n, 0.0):.4f} | {step_ms[n]:.0f} |")
    md += ["", f"bf16 within noise (gap ≤ 1.5 × seed-to-seed gap): **{out['bf16_within_noise']}**; "
           f"bf16 step {out['bf16_speedup']:.2f}× faster than fp32.", "",
           "![curves](precision_curves.png)", ""]
    (RESULTS / "precision_curves.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
