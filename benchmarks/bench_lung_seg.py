"""Lung segmentation on real chest X-rays (Shenzhen -> Shenzhen test, and -> all Montgomery, cross-site).

Compares, for 10 / 50 / all labelled Shenzhen training images: a ViT encoder pretrained by medfm's own MAE
(``medfm.train.trainer.run_pretrain``, the library behind ``medfm pretrain mae``) on the Shenzhen training
images (no labels) + UNETR decoder, the same ViT from scratch, and a MONAI UNet baseline; plus a promptable
(SAM-style) model on the pretrained encoder evaluated with one box per lung. Writes
benchmarks/results/lung_seg_medfm_mae.json and .md. CPU-friendly defaults (128 px, a few hundred steps).

    .venv/bin/python benchmarks/bench_lung_seg.py [--pretrained RUN_DIR] [--mae-steps 300] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from medfm.paths import shared_data_dir
from medfm.rundir import environment, write_json
from medfm.tasks.segment.data import load_pairs
from medfm.tasks.segment.infer import evaluate_model
from medfm.tasks.segment.train import SegTrainConfig, build_model, fit, select_labels

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "work" / "lung_seg"  # prepared store + MAE run (git-ignored)
ENC_KW = dict(embed_dim=192, depth=6, num_heads=3)


def pretraining_store(data: Path, size: int, work: Path) -> Path:
    """The Shenzhen training images (no masks, no labels) as a medfm prepared store at ``size`` px.

    Montgomery and the Shenzhen val/test images stay out, so the cross-site test never meets pretraining.
    Resized by stretching, as the segmentation pairs are (``csv_spec``), so both see the same pixels."""
    import pandas as pd

    from medfm.data.prepare import PrepareConfig, prepare

    store = work / f"store_sz_train_{size}"
    if (store / "summary.json").is_file():
        return store
    df = pd.read_csv(data / "manifest.csv")
    df = df[(df["site"] == "shenzhen") & (df["split"] == "train")]
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "sz_train_images.csv"
    # neutral case ids: the source file names must not reach the store
    pd.DataFrame(
        {
            "image": [str((data / p).resolve()) for p in df["image"]],
            "case_id": [f"case{i:04d}" for i in range(len(df))],
            "split": "train",
        }
    ).to_csv(manifest, index=False)
    cfg = PrepareConfig(
        size=size,
        resize_mode="stretch",
        allow_outside=[str(data.resolve())],
        salt_file=str(work / "salt"),
    )
    prepare(manifest, store, cfg, progress=False)
    return store


def pretrain_mae(
    data: Path, size: int, patch_size: int, steps: int, batch_size: int, work: Path = WORK
) -> Path:
    """medfm's MAE (``run_pretrain``, the library of ``medfm pretrain mae``) on the Shenzhen training images;
    library defaults except the encoder size (ViT 192d/6), steps, batch and input size."""
    from medfm.train.config import PretrainConfig
    from medfm.train.trainer import run_pretrain

    store = pretraining_store(data, size, work)
    cfg = PretrainConfig(
        objective="mae",
        data=[str(store)],
        split=None,
        out=str(work / f"mae_p{patch_size}_{size}_s{steps}_b{batch_size}"),
        encoder="vit_tiny",
        img_size=size,
        patch_size=patch_size,
        encoder_kwargs=dict(ENC_KW),
        batch_size=batch_size,
        steps=steps,
        accelerator="cpu",
        devices="1",
        ckpt_every=max(100, steps),
        threads=torch.get_num_threads(),
    )
    return run_pretrain(cfg, progress=False)


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


def mae_label(run: str | None) -> str:
    """How the pretrained encoder was made, from its run directory (medfm runs record their settings)."""
    cfg = Path(run or "") / "config.json"
    pre = json.loads(cfg.read_text()).get("pretrain", {}) if cfg.is_file() else {}
    if pre.get("objective") != "mae":
        return f"pretrained: {Path(run or '?').name}"
    return f"medfm MAE {pre['steps']} steps x {pre['batch_size']}"


def recipe(model: torch.nn.Module, base: str, args: argparse.Namespace, pre: str | None) -> str:
    """One-line description of a row's network and schedule (rows of several rounds share the table)."""
    flips = ", no flips" if args.no_flip else ""
    if base == "monai_unet":
        text = f"MONAI UNet, {args.size} px"
    else:
        cfg = model.encoder.config
        init = mae_label(pre) if base == "pretrained" else "random init"
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
    ap.add_argument(
        "--pretrained", default=None, help="encoder run dir; default: medfm MAE on Shenzhen train images"
    )
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--mae-steps", type=int, default=300)
    ap.add_argument("--mae-batch", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=8, help="ViT patch of the MAE / scratch encoder")
    ap.add_argument("--mae-only", action="store_true", help="only run the MAE pretraining, then exit")
    ap.add_argument("--workdir", default=str(WORK), help="prepared store + MAE run (reused when present)")
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
    ap.add_argument("--out", default=str(RESULTS / "lung_seg_medfm_mae.json"))
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
            "encoder": {**ENC_KW, "patch_size": args.patch_size},
            "hd95_units": "pixels of the 256 px grid (PNG has no spacing)",
            "environment": environment(),
        },
        "runs": [],
    }
    if Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        res["runs"] = old.get("runs", [])
        if "mae" in old.get("setup", {}):
            res["setup"]["mae"] = old["setup"]["mae"]
        res["commands"] = old.get("commands", [])
    cmd = " ".join([".venv/bin/python", "benchmarks/bench_lung_seg.py", *map(shlex.quote, sys.argv[1:])])
    if cmd not in res.setdefault("commands", []):
        res["commands"].append(cmd)
    pre = args.pretrained
    methods = [m for m in args.methods.split(",") if m]
    if ("pretrained" in methods or args.prompt_steps or args.mae_only) and pre is None:
        t = time.time()
        run = pretrain_mae(
            Path(args.data), args.size, args.patch_size, args.mae_steps, args.mae_batch, Path(args.workdir)
        )
        here = Path.cwd()
        # no machine-specific prefix in the results when the run lies under the working directory
        pre = str(run.resolve().relative_to(here) if run.resolve().is_relative_to(here) else run)
        metrics = json.loads((run / "metrics.json").read_text())
        res["setup"]["mae"] = {
            "library": "medfm.train.trainer.run_pretrain (medfm pretrain mae)",
            "config": json.loads((run / "config.json").read_text())["pretrain"],
            "steps": metrics["steps"],
            "first_loss": metrics["first_loss"],
            "final_loss_avg5": metrics["final_loss_avg5"],
            "seconds_with_prepare": round(time.time() - t, 1),
        }
        res["setup"]["mae"]["config"]["data"] = ["Shenzhen training images (prepared store, no labels)"]
        res["setup"]["mae"]["config"]["out"] = "(work dir)"
        print(f"mae: {pre} ({res['setup']['mae']['seconds_with_prepare']} s)", flush=True)
        if args.mae_only:
            write_json(args.out, res)
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
                "recipe": recipe(model, base, args, pre),
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


NOTES = """Notes. SZ = Shenzhen test split (114), MC = all Montgomery (138, other hospital, never in
training or pretraining). Method suffix = training steps (batch 8; nf = no random left-right flips, the
heart is on one side; evaluation on the 256 px masks with the logits upsampled). "pretrained" = a ViT
pretrained by medfm's own MAE (`medfm.train.trainer.run_pretrain`, the library behind `medfm pretrain
mae`; library defaults: 75% masking, per-patch normalised pixels, 2-block decoder of width 128, AdamW
with warmup + cosine, random resized crops) on the 396 Shenzhen training images (no labels, prepared
with `medfm.data.prepare` at the training size) + a UNETR decoder, encoder lr x0.3; the recipe column
gives the MAE's steps x batch. "scratch" = the same network from random init (encoder lr x1);
monai_unet = MONAI UNet baseline (no encoder). pp = keep the two largest connected components and fill
holes (`evaluate_model(..., keep_components=2, fill_holes=True)`); tta = left-right flip test-time
augmentation (for nf rows it mirrors images the model never saw mirrored: read pp there). HD95 in
pixels of the 256 px grid (the PNGs carry no spacing). Train s = wall seconds on 1 thread of a 2-core
CPU shared with other jobs (the load average after each run is in the json). The MAE settings, losses
and wall time are under setup.mae in the json."""


def row_recipe(r: dict) -> str:
    return r.get("recipe", "-")


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


def mae_lines(mae: dict | None) -> list[str]:
    if not mae:
        return []
    return [
        f"MAE pretraining ({mae['library']}): {mae['steps']} steps x batch {mae['config']['batch_size']} "
        f"at {mae['config']['img_size']} px, patch {mae['config']['patch_size']}, loss "
        f"{mae['first_loss']:.3f} -> {mae['final_loss_avg5']:.3f}, {mae['seconds_with_prepare']} s "
        "(prepare included)",
    ]


def write_markdown(res: dict, path: Path) -> None:
    skip = ("environment", "encoder", "pretrained_run", "mae")
    setup = {k: v for k, v in res["setup"].items() if k not in skip}
    lines = [
        "# Lung segmentation (Shenzhen train; Shenzhen test and all Montgomery)",
        "",
        f"Setup (last invocation; per-row network in the recipe column): {json.dumps(setup)}",
        f"Pretrained run of the last invocation: {res['setup'].get('pretrained_run')}",
        *mae_lines(res["setup"].get("mae")),
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
    lines += ["", res.get("notes", NOTES), "", "Status (computed from the rows above):", *status_lines(res)]
    if res.get("commands"):
        lines += ["", "Commands of the current round:", "", *("    " + c for c in res["commands"])]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
