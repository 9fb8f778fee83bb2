"""MAE pretraining throughput and memory: medfm vs lightly (timm ViT) vs MONAI MaskedAutoEncoderViT.

Same ViT-Tiny encoder (192 dim, 12 blocks, 3 heads, MLP 768), 64x64x1 images, patch 8, mask ratio 0.75,
batch 64, same decoder size (128 dim, 2 blocks, 4 heads), same AdamW, same in-memory data and thread count.
A step is forward + backward + optimizer step. Each library runs in its own fresh process (so its peak RSS is
its own) for memory and a first throughput figure; then all three run interleaved step by step in one
process (median step time), the throughput figure to trust on a shared machine.

Also measures this machine's fp32 matmul peak (torch.mm at 2048^2) and the fraction of it one medfm MAE step
reaches (FLOPs counted with torch.utils.flop_counter.FlopCounterMode).

    .venv/bin/python benchmarks/bench_mae.py                      # CPU, 2 threads
    .venv/bin/python benchmarks/bench_mae.py --device cuda --precision bf16 --batch-size 256

Writes benchmarks/results/mae_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

IMG, PATCH, CHANS, MASK = 64, 8, 1, 0.75
ENC = dict(embed_dim=192, depth=12, num_heads=3)
DEC = dict(dim=128, depth=2, heads=4)  # medfm's default decoder; "--decoder same" gives it to all three
# "--decoder defaults": each library's documented default (lightly's MAE example: 512 x 1, 16 heads;
# MONAI MaskedAutoEncoderViT: 384 x 4, 12 heads, MLP 512), medfm keeps its own default.
DEFAULT_DEC = {
    "medfm": DEC,
    "lightly": dict(dim=512, depth=1, heads=16, mlp=2048),
    "monai": dict(dim=384, depth=4, heads=12, mlp=512),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the three contenders: each returns (model, step_loss(images) -> loss) ---------------------------------
def build_medfm(dev, dec=DEC):
    from medfm.models.registry import create_encoder
    from medfm.train.mae import MAE

    enc = create_encoder("vit_tiny", spatial_dims=2, in_chans=CHANS, img_size=IMG, patch_size=PATCH, **ENC)
    model = MAE(
        enc,
        decoder_dim=dec["dim"],
        decoder_depth=dec["depth"],
        decoder_heads=dec["heads"],
        mask_ratio=MASK,
        norm_pix=True,
    ).to(dev)
    return model, lambda x: model.loss(x)


def build_lightly(dev, dec=DEC):
    import torch
    from lightly.models import utils
    from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=IMG, patch_size=PATCH, in_chans=CHANS, num_classes=0, **ENC)
    backbone = MaskedVisionTransformerTIMM(vit=vit)
    decoder = MAEDecoderTIMM(
        num_patches=vit.patch_embed.num_patches,
        patch_size=PATCH,
        in_chans=CHANS,
        embed_dim=ENC["embed_dim"],
        decoder_embed_dim=dec["dim"],
        decoder_depth=dec["depth"],
        decoder_num_heads=dec["heads"],
        mlp_ratio=dec.get("mlp", 4 * dec["dim"]) / dec["dim"],
    )
    model = torch.nn.ModuleDict({"backbone": backbone, "decoder": decoder}).to(dev)
    seq = backbone.sequence_length

    def step_loss(images):  # as in lightly's MAE example
        b = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(b, seq), mask_ratio=MASK, device=images.device)
        x_enc = backbone.encode(images=images, idx_keep=idx_keep)
        x_dec = decoder.embed(x_enc)
        x_masked = utils.repeat_token(decoder.mask_token, (b, seq))
        x_masked = utils.set_at_index(x_masked, idx_keep, x_dec.type_as(x_masked))
        x_pred = decoder.predict(utils.get_at_index(decoder.decode(x_masked), idx_mask))
        target = utils.get_at_index(utils.patchify(images, PATCH), idx_mask - 1)
        return torch.nn.functional.mse_loss(x_pred.float(), target.float())

    return model, step_loss


def build_monai(dev, dec=DEC):
    from monai.networks.nets import MaskedAutoEncoderViT

    from medfm.train.mae import mae_loss, patchify

    model = MaskedAutoEncoderViT(
        in_channels=CHANS,
        img_size=IMG,
        patch_size=PATCH,
        hidden_size=ENC["embed_dim"],
        mlp_dim=4 * ENC["embed_dim"],
        num_layers=ENC["depth"],
        num_heads=ENC["num_heads"],
        masking_ratio=MASK,
        decoder_hidden_size=dec["dim"],
        decoder_mlp_dim=dec.get("mlp", 4 * dec["dim"]),
        decoder_num_layers=dec["depth"],
        decoder_num_heads=dec["heads"],
        spatial_dims=2,
        qkv_bias=True,
    ).to(dev)

    def step_loss(images):
        pred, mask = model(images)
        return mae_loss(pred, patchify(images, PATCH, 2), mask.to(pred.dtype), norm_pix=True)

    return model, step_loss


BUILDERS = {"medfm": build_medfm, "lightly": build_lightly, "monai": build_monai}


def run_one(name: str, args: dict, q) -> None:
    """Time `steps` training steps of one contender in this (fresh) process; put the result on q."""
    import torch

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    dev = torch.device(args["device"])
    images = torch.rand(args["batch_size"], CHANS, IMG, IMG, device=dev)
    dec = DEFAULT_DEC[name] if args["decoder"] == "defaults" else DEC
    model, step_loss = BUILDERS[name](dev, dec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def amp():
        return (
            torch.autocast(dev.type, dtype=torch.bfloat16) if args["precision"] == "bf16" else nullcontext()
        )

    def step():
        with amp():
            loss = step_loss(images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(args["warmup"]):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = rss_mb()
    t0 = time.perf_counter()
    for _ in range(args["steps"]):
        loss = step()
    float(loss)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res = {
        "images_per_s": args["steps"] * args["batch_size"] / dt,
        "step_ms": 1000 * dt / args["steps"],
        "params": sum(p.numel() for p in model.parameters()),
        "peak_rss_delta_mb": max(0.0, peak_rss_mb() - base),
        "peak_rss_mb": peak_rss_mb(),
    }
    if dev.type == "cuda":
        res["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if name == "medfm":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step()
        res["flops_per_step"] = fc.get_total_flops()
    q.put((name, res))


def interleaved(names: list[str], precisions: list[str], args: dict) -> tuple[dict, dict[str, str]]:
    """Every (library, precision) contender in this process, one step each in turn, repeated: load drift
    hits all of them alike. The median step time counts: the throughput number to trust on a shared machine.

    A contender whose first step fails (MONAI's MAE under bf16 autocast) is dropped and its error returned.
    """
    import statistics

    import torch

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    dev = torch.device(args["device"])
    images = torch.rand(args["batch_size"], CHANS, IMG, IMG, device=dev)
    steps, failed = {}, {}
    for name in names:
        for prec in precisions:
            dec = DEFAULT_DEC[name] if args["decoder"] == "defaults" else DEC
            torch.manual_seed(0)
            model, step_loss = BUILDERS[name](dev, dec)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            steps[f"{name}/{prec}"] = (step_loss, opt, prec)

    def step(key: str) -> None:
        step_loss, opt, prec = steps[key]
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if prec == "bf16" else nullcontext()
        with ctx:
            loss = step_loss(images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for key in list(steps):
        try:
            step(key)
        except Exception as e:  # noqa: BLE001 - a library failing in a precision is a result, not a crash
            failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            del steps[key]
    keys = list(steps)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(args["warmup"] + args["steps"]):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for key in order:
            t0 = time.perf_counter()
            step(key)
            if r >= args["warmup"]:
                times[key].append(time.perf_counter() - t0)
    return {
        k: {
            "images_per_s": args["batch_size"] / statistics.median(v),
            "step_ms_median": 1000 * statistics.median(v),
            "step_ms_all": [round(1000 * x, 1) for x in v],
        }
        for k, v in times.items()
    }, failed


def matmul_peak(threads: int, device: str, n: int = 2048, reps: int = 10, precision: str = "fp32") -> float:
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per contender (interleaved)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=0,
                    help="also time each library alone in a fresh process (peak RSS) this many times")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="both", choices=["fp32", "bf16", "both"])
    ap.add_argument("--only", default="medfm,lightly,monai")
    ap.add_argument(
        "--decoder",
        default="same",
        choices=["same", "defaults"],
        help="same: one decoder config for all (fair); defaults: each library's own default",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mae_throughput.json"))
    a = ap.parse_args()
    precisions = ["fp32", "bf16"] if a.precision == "both" else [a.precision]
    args = {
        k: getattr(a, k)
        for k in ("threads", "batch_size", "steps", "warmup", "device", "precision", "decoder")
    }
    names = [n.strip() for n in a.only.split(",")]
    ctx = mp.get_context("spawn")
    rounds: dict[str, list[dict]] = {}
    for r in range(a.rounds):  # separate processes: each library's own peak memory
        for prec in precisions:
            for name in names if r % 2 == 0 else names[::-1]:
                q = ctx.Queue()
                p = ctx.Process(target=run_one, args=(name, {**args, "precision": prec}, q))
                p.start()
                p.join()
                if q.empty():  # the library failed in this precision (its error went to stderr)
                    continue
                got, res = q.get()
                rounds.setdefault(f"{got}/{prec}", []).append(res)
                print(f"round {r} {got}/{prec}: {res['images_per_s']:.1f} img/s, "
                      f"peak RSS +{res['peak_rss_delta_mb']:.0f} MB", flush=True)
    inter, failed = interleaved(names, precisions, args)
    for k, r in inter.items():
        print(f"interleaved {k}: {r['images_per_s']:.1f} img/s (median step {r['step_ms_median']:.0f} ms)",
              flush=True)
    for k, e in failed.items():
        print(f"{k} does not run: {e}", flush=True)
    peaks = {p: matmul_peak(a.threads, a.device, precision=p) for p in precisions}
    out: dict = {
        "benchmark": "mae_throughput",
        "command": "python benchmarks/bench_mae.py " + " ".join(sys.argv[1:]),
        "config": {**args, "img": IMG, "patch": PATCH, "in_chans": CHANS, "mask_ratio": MASK,
                   "encoder": ENC, "decoder": DEC},
        "interleaved": inter,
        "failed": failed,
        "separate_processes": {k: max(v, key=lambda x: x["images_per_s"]) for k, v in rounds.items()},
        "matmul_gflops": peaks,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
    }
    speed = {k: v["images_per_s"] for k, v in inter.items()}
    # (a) every library at its best working precision
    best = {}
    for n in names:
        got = {k.split("/")[1]: v for k, v in speed.items() if k.startswith(n + "/")}
        if got:
            prec = max(got, key=got.get)
            best[n] = {"precision": prec, "images_per_s": got[prec]}
    out["best_working_precision"] = best
    anchors = [n for n in best if n != "medfm"]
    if "medfm" in best and anchors:
        fastest = max(anchors, key=lambda n: best[n]["images_per_s"])
        out["ratio_best_precision"] = {"vs": f"{fastest}/{best[fastest]['precision']}",
                                       "medfm": f"medfm/{best['medfm']['precision']}",
                                       "ratio": best["medfm"]["images_per_s"] / best[fastest]["images_per_s"]}
    # (b) all in the same precision
    out["ratio_same_precision"] = {}
    for p in precisions:
        others = {k: v for k, v in speed.items() if k.endswith("/" + p) and not k.startswith("medfm/")}
        if f"medfm/{p}" in speed and others:
            fastest = max(others, key=others.get)
            out["ratio_same_precision"][p] = {"vs": fastest, "ratio": speed[f"medfm/{p}"] / others[fastest]}
    # share of the matmul peak (FLOPs of one medfm step counted once, in fp32 eager)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model, step_loss = build_medfm(torch.device(a.device))
    with FlopCounterMode(display=False) as fc:
        step_loss(torch.rand(a.batch_size, CHANS, IMG, IMG, device=a.device)).backward()
    flops = fc.get_total_flops()
    out["medfm_flops_per_step"] = flops
    out["medfm_share_of_matmul_peak"] = {
        p: flops / (inter[f"medfm/{p}"]["step_ms_median"] / 1000) / 1e9 / peaks[p]
        for p in precisions if f"medfm/{p}" in inter
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    Path(a.out).with_suffix(".md").write_text(to_markdown(out))
    print(to_markdown(out))


def to_markdown(out: dict) -> str:
    c = out["config"]
    lines = [
        "# MAE pretraining throughput: medfm vs lightly vs MONAI (identical architecture)",
        "",
        f"`{out['command']}` — ViT-Tiny {c['encoder']['embed_dim']}x{c['encoder']['depth']}, {c['img']} px, "
        f"patch {c['patch']}, mask {c['mask_ratio']}, batch {c['batch_size']}, decoder "
        f"{c['decoder']['dim']}x{c['decoder']['depth']}, {c['threads']} threads, {c['device']}; "
        "all contenders interleaved step by step in one process (median step).",
        "",
        "| library / precision | images/s | median step ms |",
        "|---|---|---|",
    ]
    for k, v in out["interleaved"].items():
        lines.append(f"| {k} | {v['images_per_s']:.1f} | {v['step_ms_median']:.0f} |")
    for k, e in out["failed"].items():
        lines.append(f"| {k} | fails: {e} | |")
    lines.append("")
    if "ratio_best_precision" in out:
        r = out["ratio_best_precision"]
        lines.append(f"- (a) best working precision: {r['medfm']} / {r['vs']} = **{r['ratio']:.2f}×**")
    for p, r in out["ratio_same_precision"].items():
        lines.append(f"- (b) same precision {p}: medfm/{p} / {r['vs']} = **{r['ratio']:.2f}×**")
    for p, share in out["medfm_share_of_matmul_peak"].items():
        lines.append(f"- medfm {p}: {share:.0%} of the {p} matmul peak "
                     f"({out['matmul_gflops'][p]:.0f} GFLOP/s at 2048²)")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
