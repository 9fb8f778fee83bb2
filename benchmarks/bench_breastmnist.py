"""BreastMNIST label efficiency: MAE-pretrained encoder vs from-scratch vs the published ResNet-18 (28).

Pretraining pool (unlabelled): BreastMNIST train images + the training splits of the real CXR sets in
../shared/data (cxr_lung_seg, covid_cxr_notes), all at 28 px. Evaluation: official split 546/78/156.
Writes benchmarks/results/breastmnist_label_efficiency.{json,md}.

    .venv/bin/python benchmarks/bench_breastmnist.py [--work runs/h6bench] [--steps 1200] [--seeds 3]

finetune / lora / scratch train for --epochs (clamped to [--min-steps, --max-steps]) with the best-val-AUROC
checkpoint and early stopping; on a shared 2-core CPU the results in benchmarks/results used
``--encoder-run runs/h6bench/mae_pool_28 --epochs 20 --min-steps 80 --max-steps 300 --patience 6
--trained-seeds 1`` (+ extra trained seeds run separately with AdaptConfig.first_seed and merged).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from medfm.paths import shared_data_dir

try:  # run as a script: benchmarks/ is on sys.path
    import label_efficiency as bench
except ImportError:  # pragma: no cover - imported as benchmarks.<name> from the repo root
    from benchmarks import label_efficiency as bench

ENCODER_ARGS = '{"depth": 4, "embed_dim": 128, "num_heads": 4}'


def pool_and_pretrain(work: Path, size: int, patch: int, steps: int) -> Path:
    d = shared_data_dir()
    breast = bench.prepare("medmnist:breastmnist", work / f"breastmnist_{size}", size)
    tb = bench.prepare(d / "cxr_lung_seg", work / f"cxr_lung_seg_{size}", size, labels="tuberculosis")
    covid = bench.prepare(d / "covid_cxr_notes", work / f"covid_cxr_notes_{size}", size)
    pool = bench.merge_pool([breast, tb, covid], work / f"pool_{size}")
    return bench.pretrain(pool, work / f"mae_pool_{size}", steps, size, patch, ENCODER_ARGS)


def resnet_reference(work: Path, size: int, width: int) -> Path:
    """An untrained MedMNIST-style ResNet-18 (3x3 stem, no max-pool) saved as a run: its `scratch` rows
    reproduce the published baseline's architecture under this benchmark's training recipe."""
    from medfm.models import create_encoder
    from medfm.models.io import save_encoder

    run = work / f"resnet18_w{width}_{size}"
    if not (run / "model.safetensors").is_file():
        torch.manual_seed(0)
        save_encoder(create_encoder("resnet18", img_size=size, small_input=True, width=width), run)
    return run


def describe_encoder(run: Path, default_steps: int) -> str:
    """'<encoder> <options>, <objective> <steps> steps' from a pretraining run's config.json."""
    import json

    try:
        conf = json.loads((Path(run) / "config.json").read_text())
        enc = dict(conf["encoder"])
        objective = conf.get("pretrain", {}).get("objective", "pretraining")
    except (OSError, KeyError, ValueError):
        return f"encoder {run}"
    name = enc.pop("name")
    keep = ("patch_size", "embed_dim", "depth", "width", "small_input", "layers")
    opts = ", ".join(f"{k} {enc[k]}" for k in keep if k in enc)
    # Which unlabelled images it saw matters as much as the objective (mixed pool vs BreastMNIST train only).
    data = [f"{Path(d['path']).name} ({d.get('images', '?')} images, {d.get('split', 'train')})"
            for d in conf.get("data", []) if isinstance(d, dict) and "path" in d]
    seen = f" on {' + '.join(data)}, labels unused" if data else " on the unlabelled pool"
    return f"encoder {name} ({opts}), {objective} {bench.mae_steps(run, default_steps)} steps{seen}"


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Options shared by the label-efficiency benchmarks (BreastMNIST, tuberculosis)."""
    ap.add_argument("--work", type=Path, default=Path("runs/h6bench"))
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1200, help="MAE pretraining steps")
    ap.add_argument("--adapt-steps", type=int, default=0,
                    help="fixed finetune/lora/scratch steps; 0: --epochs, best-val selection")
    ap.add_argument("--epochs", type=float, default=60.0, help="finetune/lora/scratch epochs")
    ap.add_argument("--min-steps", type=int, default=150)
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--patience", type=int, default=15, help="early stopping, in epochs")
    ap.add_argument("--trained-seeds", type=int, default=0,
                    help="seeds for finetune/lora/scratch (0: --seeds); they cost minutes per run on a CPU")
    ap.add_argument("--fractions", default="0.1,1.0", help="label fractions (comma-separated)")
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--encoder-run", type=Path, default=None,
                    help="use this pretrained run instead of pretraining one (e.g. a longer MAE run)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="linear,knn,prototype,finetune,lora,scratch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results-name", default="", help="results file stem (default: the benchmark's)")
    ap.add_argument("--lr-finetune", type=float, default=None,
                    help="finetune/lpft encoder lr (top layer; default: AdaptConfig's)")
    ap.add_argument("--layer-decay", type=float, default=None, help="finetune/lpft layer-wise lr decay")
    ap.add_argument("--resnet-reference", type=int, default=0, metavar="WIDTH",
                    help="also train a from-scratch ResNet-18 (28 px stem) of this base width (64 = the "
                    "published one) with the same recipe; 0: off")


def adapt_overrides(args: argparse.Namespace) -> dict:
    """AdaptConfig fields set on the command line (the rest keep their defaults)."""
    kw = {"lr_finetune": args.lr_finetune, "layer_decay": args.layer_decay}
    return {k: v for k, v in kw.items() if v is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MEDFM_PROGRESS", "0")
    t0 = time.perf_counter()
    run = args.encoder_run or pool_and_pretrain(args.work, args.size, args.patch, args.steps)
    t_pre = time.perf_counter() - t0
    data = args.work / f"breastmnist_{args.size}"
    methods = [m for m in args.methods.split(",") if m]
    res = pd.DataFrame()
    if methods:  # --methods "" with --resnet-reference: only the reference (its own results file)
        res = bench.label_efficiency_split(run, data, args.work / "adapt_breastmnist", methods,
                                           args.fractions, args.shots, args.seeds,
                                           args.trained_seeds or args.seeds, args.adapt_steps,
                                           epochs=args.epochs, min_steps=args.min_steps,
                                           max_steps=args.max_steps, patience=args.patience,
                                           **adapt_overrides(args))
    if args.resnet_reference:
        ref = resnet_reference(args.work, args.size, args.resnet_reference)
        out = args.work / "adapt_breastmnist" / "resnet_reference"
        r = bench.label_efficiency(ref, data, out, ["scratch"],
                                   args.fractions, args.shots, args.trained_seeds or args.seeds,
                                   args.adapt_steps,
                                   epochs=args.epochs, min_steps=args.min_steps, max_steps=args.max_steps,
                                   patience=args.patience)
        r["method"] = f"scratch ResNet-18 (width {args.resnet_reference})"
        res = pd.concat([res, r], ignore_index=True)
    wall = time.perf_counter() - t0
    recipe = bench.recipe(args.adapt_steps, args.epochs, args.min_steps, args.max_steps, args.patience,
                          **adapt_overrides(args))
    meta = {"description": f"BreastMNIST ({args.size} px), official split 546/78/156; "
                           f"{describe_encoder(run, args.steps)}; "
                           f"{recipe}; {args.seeds} seeds (finetune/lora/scratch: "
                           f"{args.trained_seeds or args.seeds}).",
            "encoder_run": str(run), "data": str(data), "pretrain_and_prepare_s": round(t_pre, 1),
            "wall_s": round(wall, 1), "threads": args.threads,
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared with other jobs: timings noisy)"}
    name = args.results_name or (
        "breastmnist_label_efficiency" if methods else "breastmnist_resnet_reference")
    js, md = bench.write_results(name, res, Path("benchmarks/results"), meta,
                                 {"ResNet-18 (28), MedMNIST v2": {"auroc": 0.901, "acc": 0.863}})
    print(md.read_text())
    print(f"wrote {js}")


if __name__ == "__main__":
    main()
