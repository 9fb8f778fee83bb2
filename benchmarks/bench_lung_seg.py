"""Lung segmentation on real chest X-rays (Shenzhen -> Shenzhen test, and -> all Montgomery, cross-site).

Compares, for 10 / 50 / all labelled Shenzhen training images: a ViT encoder pretrained with MAE on
Shenzhen training images (no labels) + UNETR decoder, the same from scratch, and a MONAI UNet baseline;
plus a promptable (SAM-style) model on the pretrained encoder evaluated with one box per lung.
Writes benchmarks/results/lung_seg.json and lung_seg.md. CPU-friendly defaults (128 px, few hundred steps).

    .venv/bin/python benchmarks/bench_lung_seg.py [--pretrained RUN_DIR] [--steps 300] [--size 128]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from medfm.paths import shared_data_dir
from medfm.runs import environment, write_json
from medfm.tasks.segment.data import load_pairs
from medfm.tasks.segment.infer import evaluate_model
from medfm.tasks.segment.train import SegTrainConfig, build_model, fit, select_labels

RESULTS = Path(__file__).parent / "results"
ENC_KW = dict(embed_dim=192, depth=6, num_heads=3, patch_size=16)


def mini_mae(images: torch.Tensor, size: int, steps: int, seed: int = 0) -> Path:
    """Fallback when no `medfm pretrain mae` run exists: a small MAE (75% masking, pixel loss on masked
    patches, linear decoder) on unlabelled images, saved as a medfm encoder run directory."""
    from medfm.models.io import save_encoder
    from medfm.models.registry import create_encoder

    torch.manual_seed(seed)
    enc = create_encoder("vit_tiny", img_size=size, **ENC_KW)
    p = ENC_KW["patch_size"]
    dec = torch.nn.Sequential(
        torch.nn.Linear(enc.embed_dim, 128), torch.nn.GELU(), torch.nn.Linear(128, p * p)
    )
    mask_tok = torch.nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
    opt = torch.optim.AdamW([*enc.parameters(), *dec.parameters(), mask_tok], lr=1.5e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1.5e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = images[torch.randint(len(images), (16,), generator=g)]
        tokens = enc.patch_tokens(x)  # (B, N, D)
        b, n, d = tokens.shape
        keep = n // 4
        order = torch.rand(b, n, generator=g).argsort(1)
        vis = order[:, :keep]
        enc_out = enc.forward_tokens(torch.gather(tokens, 1, vis[..., None].expand(-1, -1, d)))[:, 1:]
        full = mask_tok.expand(b, n, d).clone()
        full.scatter_(1, vis[..., None].expand(-1, -1, d), enc_out)
        pred = dec(full + enc.pos_embed_for(enc.grid))
        target = x.unfold(2, p, p).unfold(3, p, p).reshape(b, -1, p * p)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        masked = torch.ones(b, n, dtype=torch.bool)
        masked.scatter_(1, vis, False)
        loss = ((pred - target) ** 2).mean(-1)[masked].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"mae step {step} loss {float(loss):.4f}", flush=True)
    out = RESULTS / "runs" / "mini_mae"
    save_encoder(enc, out)
    write_json(
        out / "config.json", {"objective": "mae (benchmark fallback)", "steps": steps, "encoder": enc.config}
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(shared_data_dir() / "cxr_lung_seg"))
    ap.add_argument("--pretrained", default=None, help="MAE run dir; default: a quick built-in MAE")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--mae-steps", type=int, default=600)
    ap.add_argument("--prompt-steps", type=int, default=300)
    ap.add_argument("--labels", default="10,50,all")
    ap.add_argument(
        "--feature-size", type=int, default=8, help="UNETR decoder width (8 keeps CPU runs short)"
    )
    ap.add_argument("--methods", default="pretrained,scratch,monai_unet")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--encoder-lr-scale", type=float, default=0.3, help="lr factor of the pretrained encoder")
    ap.add_argument("--decoder", default="auto", help="auto | unetr | unet (ignored for monai_unet)")
    ap.add_argument("--tag", default="", help="suffix of the method names (e.g. the step count)")
    ap.add_argument("--save", default=None, help="folder for each model's weights (re-evaluation later)")
    ap.add_argument(
        "--init", default=None, help="start from saved weights (a --save file): continue training"
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tta", action="store_true", help="also evaluate with flip TTA (+ post-processing)")
    ap.add_argument("--out", default=str(RESULTS / "lung_seg.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    train = load_pairs(args.data, "train", "shenzhen", args.size)
    test_sz = load_pairs(args.data, "test", "shenzhen", args.size)
    test_mc = load_pairs(args.data, None, "montgomery", args.size)
    print(
        f"data: {len(train)} train, {len(test_sz)} shenzhen test, {len(test_mc)} montgomery "
        f"({time.time() - t0:.0f}s)"
    )
    res: dict = {
        "setup": {
            "size": args.size,
            "steps": args.steps,
            "feature_size": args.feature_size,
            "batch_size": 8,
            "encoder_lr_scale": args.encoder_lr_scale,
            "decoder": args.decoder,
            "postprocess": "keep the 2 largest components, fill holes (the *_pp columns)",
            "encoder": ENC_KW,
            "hd95_units": "pixels of the 256 px grid (PNG has no spacing)",
            "environment": environment(),
        },
        "runs": [],
    }
    if Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        res["runs"] = old.get("runs", [])
        if "mae_seconds" in old.get("setup", {}):
            res["setup"]["mae_seconds"] = old["setup"]["mae_seconds"]
    pre = args.pretrained
    methods = [m for m in args.methods.split(",") if m]
    if ("pretrained" in methods or args.prompt_steps) and pre is None:
        t = time.time()
        pre = str(mini_mae(train.images, args.size, args.mae_steps))
        res["setup"]["mae_seconds"] = round(time.time() - t, 1)
    res["setup"]["pretrained_run"] = pre
    # "scratch" = the pretrained run's architecture, freshly initialised (a fair comparison)
    scratch_name, scratch_kw = "vit_tiny", dict(ENC_KW)
    if pre is not None:
        from medfm.models.io import load_encoder

        enc_cfg = dict(load_encoder(pre).config)
        scratch_name = enc_cfg.pop("name")
        scratch_kw = {k: v for k, v in enc_cfg.items() if k not in ("spatial_dims", "in_chans", "img_size")}
    res["setup"]["encoder"] = {"name": scratch_name, **scratch_kw}
    for n in args.labels.split(","):
        n_labels = None if n == "all" else int(n)
        for base in methods:
            method = base + args.tag
            if any(r["method"] == method and r.get("n_labels_requested") == n for r in res["runs"]):
                continue  # already measured (use a fresh --out to redo)
            cfg = SegTrainConfig(
                encoder=pre if base == "pretrained" else scratch_name,
                encoder_kwargs={} if base == "pretrained" else scratch_kw,
                decoder="monai_unet" if base == "monai_unet" else args.decoder,
                n_labels=n_labels,
                steps=args.steps,
                batch_size=8,
                lr=args.lr,
                encoder_lr_scale=args.encoder_lr_scale if base == "pretrained" else 1.0,
                progress=False,
                feature_size=args.feature_size,
            )
            sub = select_labels(train, n_labels, 0)
            model = build_model(cfg, 2, 1, [args.size, args.size], 2)
            if args.init:
                from safetensors.torch import load_file

                model.load_state_dict(load_file(args.init))
            secs = fit(model, sub, [args.size, args.size], cfg)
            if args.save:
                from safetensors.torch import save_file

                Path(args.save).mkdir(parents=True, exist_ok=True)
                sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
                save_file(sd, str(Path(args.save) / f"{method}_{n}.safetensors"))
            row = {
                "method": method,
                "n_labels": len(sub),
                "n_labels_requested": n,
                "steps": args.steps,
                "train_seconds": round(secs, 1),
            }
            pp = dict(keep_components=2, fill_holes=True)
            for key, pairs in (("shenzhen_test", test_sz), ("montgomery", test_mc)):
                row[key] = evaluate_model(model, pairs, 2, class_names=["lung"])["lung"]
                row[key + "_pp"] = evaluate_model(model, pairs, 2, class_names=["lung"], **pp)["lung"]
                if args.tta:
                    row[key + "_tta_pp"] = evaluate_model(
                        model, pairs, 2, class_names=["lung"], flip_tta=True, **pp
                    )["lung"]
            print(json.dumps(row), flush=True)
            res["runs"] = [r for r in res["runs"] if (r["method"], r["n_labels"]) != (method, len(sub))] + [
                row
            ]
            write_json(args.out, res)
    if args.prompt_steps and not any(r["method"] == "promptable_box_per_lung" for r in res["runs"]):
        from medfm.models.io import load_encoder
        from medfm.models.seg.sam import build_promptable
        from medfm.tasks.segment.prompts import evaluate_box_prompts, train_promptable_steps

        torch.manual_seed(0)
        model = build_promptable(
            load_encoder(pre),
            args.size,
            prompt_dim=128,
            decoder_depth=2,
            decoder_heads=4,
            decoder_mlp_dim=512,
            iou_head_hidden_dim=128,
        )
        t = time.time()
        train_promptable_steps(
            model,
            train.images,
            train.masks,
            steps=args.prompt_steps,
            batch_size=8,
            lr=1e-3,
            encoder_lr_scale=0.3,
        )
        secs = time.time() - t
        row = {
            "method": "promptable_box_per_lung",
            "n_labels": len(train),
            "train_seconds": round(secs, 1),
            "shenzhen_test": evaluate_box_prompts(model, test_sz.images, test_sz.masks),
            "montgomery": evaluate_box_prompts(model, test_mc.images, test_mc.masks),
            "note": "Dice at the training size (128 px) of the union of one-box-per-lung masks",
        }
        print(json.dumps(row), flush=True)
        res["runs"] = [r for r in res["runs"] if r["method"] != row["method"]] + [row]
    res["total_seconds"] = round(time.time() - t0, 1)
    write_json(args.out, res)
    write_markdown(res, Path(args.out).with_suffix(".md"))


def write_markdown(res: dict, path: Path) -> None:
    lines = [
        "# Lung segmentation (Shenzhen train; Shenzhen test and all Montgomery)",
        "",
        f"Setup: {json.dumps({k: v for k, v in res['setup'].items() if k != 'environment'})}",
        "",
        "| method | labelled | steps | Dice SZ | HD95 SZ | SurfDice SZ | Dice MC | HD95 MC | SurfDice MC "
        "| Dice SZ pp | HD95 SZ pp | Dice MC pp | HD95 MC pp | Dice SZ tta+pp | Dice MC tta+pp | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in res["runs"]:
        a, b = r["shenzhen_test"], r["montgomery"]
        ap, bp = r.get("shenzhen_test_pp", {}), r.get("montgomery_pp", {})
        lines.append(
            f"| {r['method']} | {r['n_labels']} | {r.get('steps', '-')} | {a['dice']:.3f} | "
            f"{a.get('hd95_mm', nan):.1f} | {a.get('surface_dice', nan):.3f} | {b['dice']:.3f} | "
            f"{b.get('hd95_mm', nan):.1f} | {b.get('surface_dice', nan):.3f} | "
            f"{ap.get('dice', nan):.3f} | {ap.get('hd95_mm', nan):.1f} | {bp.get('dice', nan):.3f} | "
            f"{bp.get('hd95_mm', nan):.1f} | {r.get('shenzhen_test_tta_pp', {}).get('dice', nan):.3f} | "
            f"{r.get('montgomery_tta_pp', {}).get('dice', nan):.3f} | {r['train_seconds']} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
