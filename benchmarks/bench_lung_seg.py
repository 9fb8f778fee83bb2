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
import os
import shlex
import sys
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


def mini_mae(
    images: torch.Tensor,
    size: int,
    steps: int,
    seed: int = 0,
    patch_size: int = 16,
    batch_size: int = 16,
    out: Path | None = None,
) -> Path:
    """Fallback when no `medfm pretrain mae` run exists: a small MAE (75% masking, pixel loss on masked
    patches, linear decoder) on unlabelled images, saved as a medfm encoder run directory."""
    from medfm.models.io import save_encoder
    from medfm.models.registry import create_encoder

    torch.manual_seed(seed)
    enc = create_encoder("vit_tiny", img_size=size, **{**ENC_KW, "patch_size": patch_size})
    p = patch_size
    dec = torch.nn.Sequential(
        torch.nn.Linear(enc.embed_dim, 128), torch.nn.GELU(), torch.nn.Linear(128, p * p)
    )
    mask_tok = torch.nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
    opt = torch.optim.AdamW([*enc.parameters(), *dec.parameters(), mask_tok], lr=1.5e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1.5e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = images[torch.randint(len(images), (batch_size,), generator=g)]
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
    suffix = "" if size == 128 else f"_{size}"  # the 128 px runs kept their original names
    out = Path(out) if out else RESULTS / "runs" / f"mini_mae_p{patch_size}{suffix}"
    save_encoder(enc, out)
    write_json(
        out / "config.json",
        {
            "objective": "mae (benchmark fallback)",
            "steps": steps,
            "batch_size": batch_size,
            "data": f"{len(images)} Shenzhen training images at {size} px (no labels)",
            "encoder": enc.config,
            "seconds": round(time.time() - t0, 1),
        },
    )
    return out


class LogitMean(torch.nn.Module):
    """Ensemble: the mean of the members' logits (consistent with flip TTA, which also averages logits)."""

    def __init__(self, members: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.encoder = members[0].encoder
        self.decoder_name = getattr(members[0], "decoder_name", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def ensemble(
    files: list[str], cfg: SegTrainConfig, size: int, rows: list[dict], n: str
) -> tuple[torch.nn.Module, float]:
    """Load saved members; train seconds = the sum over the members' rows (methods from the file names)."""
    from safetensors.torch import load_file

    members, secs = [], 0.0
    for f in files:
        m = build_model(cfg, 2, 1, [size, size], 2)
        m.load_state_dict(load_file(f))
        members.append(m.eval())
        method = Path(f).stem.removesuffix(f"_{n}")
        secs += next(
            r["train_seconds"] for r in rows if r["method"] == method and r.get("n_labels_requested") == n
        )
    return LogitMean(members), secs


def recipe(model: torch.nn.Module, base: str, args: argparse.Namespace) -> str:
    """One-line description of a row's network and schedule (rows of several rounds share the table)."""
    flips = ", no flips" if args.no_flip else ""
    if base == "monai_unet":
        text = f"MONAI UNet, {args.size} px"
    else:
        cfg = model.encoder.config
        init = "MAE-pretrained" if base == "pretrained" else "random init"
        text = (
            f"ViT p{cfg['patch_size']} {cfg['embed_dim']}d/{cfg['depth']} ({init}) + "
            f"{model.decoder_name.upper()} fs{args.feature_size}, {args.size} px"
        )
    if args.ensemble:
        names = [Path(f).stem.removesuffix(f"_{args.labels}") for f in args.ensemble.split(",")]
        return f"mean logits of {' + '.join(names)} ({text})"
    return text + flips + (f", continued from {Path(args.init).name} at lr {args.lr}" if args.init else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(shared_data_dir() / "cxr_lung_seg"))
    ap.add_argument("--pretrained", default=None, help="MAE run dir; default: a quick built-in MAE")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--mae-steps", type=int, default=600)
    ap.add_argument("--mae-batch", type=int, default=16)
    ap.add_argument("--patch-size", type=int, default=16, help="ViT patch of the built-in MAE / scratch")
    ap.add_argument("--mae-only", action="store_true", help="only pretrain the built-in MAE, then exit")
    ap.add_argument("--markdown-only", action="store_true", help="only rewrite the .md from the --out json")
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
    ap.add_argument(
        "--no-flip", action="store_true", help="no left-right flip augmentation (the heart is on one side)"
    )
    ap.add_argument(
        "--ensemble",
        default=None,
        help="comma-separated --save weight files of one method (same network): evaluate the mean of "
        "their logits instead of training (train s = sum of the members' rows)",
    )
    ap.add_argument("--tta", action="store_true", help="also evaluate with flip TTA (+ post-processing)")
    ap.add_argument("--out", default=str(RESULTS / "lung_seg.json"))
    args = ap.parse_args()
    if args.markdown_only:
        write_markdown(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".md"))
        return
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
        res["commands"] = old.get("commands", [])
    cmd = " ".join([".venv/bin/python", "benchmarks/bench_lung_seg.py", *map(shlex.quote, sys.argv[1:])])
    if cmd not in res.setdefault("commands", []):
        res["commands"].append(cmd)
    pre = args.pretrained
    methods = [m for m in args.methods.split(",") if m]
    if ("pretrained" in methods or args.prompt_steps or args.mae_only) and pre is None:
        t = time.time()
        pre = str(
            mini_mae(
                train.images, args.size, args.mae_steps, patch_size=args.patch_size, batch_size=args.mae_batch
            )
        )
        res["setup"]["mae_seconds"] = round(time.time() - t, 1)
        print(f"mae: {pre} ({res['setup']['mae_seconds']} s)", flush=True)
        if args.mae_only:
            return
    res["setup"]["pretrained_run"] = pre
    # "scratch" = the pretrained run's architecture, freshly initialised (a fair comparison)
    scratch_name, scratch_kw = "vit_tiny", {**ENC_KW, "patch_size": args.patch_size}
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
                flip=not args.no_flip,
            )
            sub = select_labels(train, n_labels, 0)
            model = build_model(cfg, 2, 1, [args.size, args.size], 2)
            if args.init:
                from safetensors.torch import load_file

                model.load_state_dict(load_file(args.init))
            if args.ensemble:
                model, secs = ensemble(args.ensemble.split(","), cfg, args.size, res["runs"], n)
            else:
                secs = fit(model, sub, [args.size, args.size], cfg)
            if args.save and not args.ensemble:
                from safetensors.torch import save_file

                Path(args.save).mkdir(parents=True, exist_ok=True)
                sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
                save_file(sd, str(Path(args.save) / f"{method}_{n}.safetensors"))
            row = {
                "method": method,
                "n_labels": len(sub),
                "n_labels_requested": n,
                "steps": f"{args.steps} x{len(args.ensemble.split(','))}" if args.ensemble else args.steps,
                "recipe": recipe(model, base, args),
                "flip_augment": not args.no_flip,
                "train_seconds": round(secs, 1),
                "load_avg_1min_after": round(os.getloadavg()[0], 2),
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


OLD_VIT = "ViT p16 192d/6 ({}) + UNETR fs8, 128 px"

NOTES = """Notes. SZ = Shenzhen test split (114), MC = all Montgomery (138, other hospital, never in
training or pretraining). Method suffix = training steps (batch 8; evaluation on the 256 px masks with
the logits upsampled). "pretrained" = a ViT pretrained by this script's built-in MAE (75% masking, per-
patch normalised pixel loss, linear decoder) on the 396 Shenzhen training images (no labels) + a UNETR
decoder, encoder lr x0.3; "scratch" = the same network from random init (encoder lr x1); monai_unet =
MONAI UNet baseline (no encoder). The recipe column says which ViT (patch size p, width/depth) and
decoder width (fs) a row used: rows of the earlier round use ViT p16 at 128 px (8x8 tokens), the current
round ViT p8 (16x16 tokens, same width and depth; its MAE redone for p8: 600 steps, batch 32,
benchmarks/results/runs/mini_mae_p8). Suffix nf = trained without the random left-right flip augmentation
(--no-flip): on a chest X-ray the heart is on the image's right, and with flips the worst Shenzhen cases
were mostly a missed lower left lung next to the heart. For nf rows the flip-TTA column mirrors images
the model never saw mirrored, so read the pp column there. Suffix 800x2 = an ensemble (mean logits) of
the _800 and _800nf models of the same method: two trainings, twice the training compute (train s is
their sum) and twice the inference cost. pp = post-processing (keep the two largest connected components,
fill holes: `evaluate_model(..., keep_components=2, fill_holes=True)`, CLI `medfm segment
evaluate/predict --keep-components 2 --fill-holes`). tta = left-right flip test-time augmentation
(`flip_tta=True`). HD95 in pixels of the 256 px grid (the PNGs carry no spacing). Promptable = SAM-style
decoder on the p16 pretrained encoder, one box per lung, Dice at 128 px. Rows of the earlier round were
timed on a shared CPU with ~8 other jobs (inflated); current rows on 1 thread beside one other job (the
load average after each run is in lung_seg.json). The p8 MAE run was made with `.venv/bin/python
benchmarks/bench_lung_seg.py --mae-only --patch-size 8 --mae-steps 600 --mae-batch 32`; the commands of
the earlier round are in the git history of this file. Rows with "256 px" in the recipe (suffix _256)
train and predict at the masks' native 256 px (no logit upsampling): ViT p16 (16x16 tokens, the same
token count as p8 at 128 px) pretrained by the built-in MAE at 256 px (600 steps, batch 32,
benchmarks/results/runs/mini_mae_p16_256, made with `--mae-only --size 256 --patch-size 16 --mae-steps
600 --mae-batch 32`), no flips; MONAI UNet and scratch at 256 px are their equal-step references."""


def row_recipe(r: dict) -> str:
    if "recipe" in r:
        return r["recipe"]
    m = r["method"]
    if m.startswith("monai_unet"):
        return "MONAI UNet, 128 px"
    if m.startswith("promptable"):
        return "SAM-style decoder on MAE ViT p16, 128 px"
    return OLD_VIT.format("random init" if m.startswith("scratch") else "MAE-pretrained")


def _dice(r: dict, key: str) -> float:
    return r.get(key, {}).get("dice", float("nan"))


def status_lines(res: dict) -> list[str]:
    """Targets and the equal-step comparison, computed from the rows (no hand-typed numbers)."""
    out = []
    for req, target in (("all", 0.95), ("10", 0.90)):
        rows = [
            r
            for r in res["runs"]
            if r["method"].startswith("pretrained") and r.get("n_labels_requested") == req
        ]
        if not rows:
            continue
        best = max(rows, key=lambda r: _dice(r, "shenzhen_test"))
        raw, pp, tta = (_dice(best, k) for k in ("shenzhen_test", "shenzhen_test_pp", "shenzhen_test_tta_pp"))
        ok = (
            "reached"
            if raw >= target
            else "reached with pp"
            if pp >= target
            else "NOT reached raw or with pp"
        )
        ok += " (tta+pp reaches it)" if raw < target and tta >= target else ""
        out.append(
            f"- {req} labels, pretrained, target Dice SZ >= {target}: best row {best['method']} "
            f"({row_recipe(best)}): {raw:.3f} raw / {pp:.3f} pp / {tta:.3f} tta+pp -- {ok}."
        )
    # equal-budget groups: same suffix (steps) and labels, several bases
    groups: dict = {}
    for r in res["runs"]:
        for base in ("pretrained", "scratch", "monai_unet"):
            if r["method"].startswith(base):
                groups.setdefault((r["method"][len(base) :], r["n_labels"]), {})[base] = r
    for (tag, n), g in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if len(g) < 2:
            continue
        parts = [
            f"{b} {_dice(r, 'shenzhen_test'):.3f} / {_dice(r, 'montgomery'):.3f}"
            + (
                f" (pp {_dice(r, 'shenzhen_test_pp'):.3f} / {_dice(r, 'montgomery_pp'):.3f})"
                if "shenzhen_test_pp" in r
                else ""
            )
            for b, r in g.items()
        ]
        out.append(f"- equal steps ({tag.lstrip('_')}), {n} labels, Dice SZ / MC: " + "; ".join(parts) + ".")
    return out


def write_markdown(res: dict, path: Path) -> None:
    setup = {k: v for k, v in res["setup"].items() if k not in ("environment", "encoder", "pretrained_run")}
    lines = [
        "# Lung segmentation (Shenzhen train; Shenzhen test and all Montgomery)",
        "",
        f"Setup (last invocation; per-row network in the recipe column): {json.dumps(setup)}",
        f"Pretrained run of the last invocation: {res['setup'].get('pretrained_run')}",
        "",
        "| method | recipe | labelled | steps | Dice SZ | HD95 SZ | SurfDice SZ | Dice MC | HD95 MC "
        "| SurfDice MC | Dice SZ pp | HD95 SZ pp | Dice MC pp | HD95 MC pp | Dice SZ tta+pp "
        "| Dice MC tta+pp | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for r in res["runs"]:
        a, b = r["shenzhen_test"], r["montgomery"]
        ap, bp = r.get("shenzhen_test_pp", {}), r.get("montgomery_pp", {})
        lines.append(
            f"| {r['method']} | {row_recipe(r)} | {r['n_labels']} | {r.get('steps', '-')} | "
            f"{a['dice']:.3f} | {a.get('hd95_mm', nan):.1f} | {a.get('surface_dice', nan):.3f} | "
            f"{b['dice']:.3f} | "
            f"{b.get('hd95_mm', nan):.1f} | {b.get('surface_dice', nan):.3f} | "
            f"{ap.get('dice', nan):.3f} | {ap.get('hd95_mm', nan):.1f} | {bp.get('dice', nan):.3f} | "
            f"{bp.get('hd95_mm', nan):.1f} | {r.get('shenzhen_test_tta_pp', {}).get('dice', nan):.3f} | "
            f"{r.get('montgomery_tta_pp', {}).get('dice', nan):.3f} | {r['train_seconds']} |"
        )
    lines += ["", NOTES, "", "Status (computed from the rows above):", *status_lines(res)]
    if res.get("commands"):
        lines += ["", "Commands of the current round:", "", *("    " + c for c in res["commands"])]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
