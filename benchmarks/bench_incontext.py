"""In-context segmentation on chest-X-ray phantoms: train episodically on some structures, evaluate on
structures never seen in training (default: train heart, spine and findings; test both lungs), with 1 and 5
reference images and no weight update. Writes benchmarks/results/incontext.json and .md.

    .venv/bin/python benchmarks/bench_incontext.py [--data PHANTOM_DIR] [--steps 400] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from medfm.models.registry import create_encoder
from medfm.models.seg.incontext import IncontextSegmenter
from medfm.paths import shared_data_dir
from medfm.rundir import environment, write_json
from medfm.tasks.segment.data import load_pairs
from medfm.tasks.segment.incontext import evaluate_incontext, train_incontext

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/medfm_bench_phantom_cxr")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--train-labels", default="3,4,5,6,7,8,9")
    ap.add_argument("--test-labels", default="1,2")
    ap.add_argument("--task-augment", type=float, default=0.5, help="fraction of synthetic-task episodes")
    ap.add_argument("--prior", default="knn", help="knn | prototype (see IncontextSegmenter)")
    ap.add_argument(
        "--real",
        default=str(shared_data_dir() / "cxr_lung_seg"),
        help="real CXR lungs as a held-out structure",
    )
    ap.add_argument("--max-queries", type=int, default=40, help="real-lung queries per evaluation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "incontext.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    if not (root / "manifest.csv").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "medfm.cli.app",
                "data",
                "phantom",
                "--kind",
                "cxr",
                "--n",
                "160",
                "--size",
                "128",
                "--mask-set",
                "all",
                "--out",
                str(root),
            ],
            check=True,
        )
    names = json.loads((root / "dataset.json").read_text())["mask_labels"]
    train, test = load_pairs(root, "train", None, args.size), load_pairs(root, "test", None, args.size)
    tr_labels = [int(x) for x in args.train_labels.split(",")]
    te_labels = [int(x) for x in args.test_labels.split(",")]
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", img_size=args.size, patch_size=8, embed_dim=96, depth=4, num_heads=3)
    model = IncontextSegmenter(enc, dim=64, feature_size=16, prior=args.prior)
    real = None
    if Path(args.real, "manifest.csv").is_file():
        real_ref = load_pairs(args.real, "train", "shenzhen", args.size)
        real_q = load_pairs(args.real, "test", "shenzhen", args.size)
        real = (real_q.images, real_q.masks, real_ref.images, real_ref.masks)

    def evaluate(tag: str) -> None:
        for k in (1, 5):
            for which, labels in (("held_out", te_labels), ("seen", tr_labels[:2])):
                r = evaluate_incontext(
                    model, test.images, test.masks, labels, k, ref_images=train.images, ref_masks=train.masks
                )
                res["results"][f"{tag}{which}_k{k}"] = {
                    names[key.split("_")[1]] if key != "mean" else "mean": round(v, 4) for key, v in r.items()
                }
                print(tag, which, k, res["results"][f"{tag}{which}_k{k}"], flush=True)
            if real is not None:
                qi, qm, ri, rm = real
                r = evaluate_incontext(
                    model, qi, qm, [1], k, ref_images=ri, ref_masks=rm, max_queries=args.max_queries
                )
                res["results"][f"{tag}real_lungs_k{k}"] = {"lungs": round(r["label_1"], 4)}
                print(tag, "real lungs", k, r, flush=True)

    res: dict = {"results": {}}
    evaluate("untrained_")  # the same network before training: the reference-driven prior alone
    t = time.time()
    hist = train_incontext(
        model,
        train.images,
        train.masks,
        tr_labels,
        args.steps,
        batch_size=4,
        lr=1e-3,
        encoder_lr_scale=1.0,
        task_augment=args.task_augment,
    )
    secs = time.time() - t
    res["setup"] = {
        "size": args.size,
        "task_augment": args.task_augment,
        "steps": args.steps,
        "train_labels": {i: names[str(i)] for i in tr_labels},
        "test_labels": {i: names[str(i)] for i in te_labels},
        "n_train": len(train),
        "n_test_queries": len(test),
        "train_seconds": round(secs, 1),
        "loss_first_last": [round(sum(hist[:20]) / 20, 4), round(sum(hist[-20:]) / 20, 4)],
        "prior": args.prior,
        "real_lungs": "cxr_lung_seg Shenzhen: test queries, train references (never trained on)",
        "environment": environment(),
    }
    evaluate("")
    write_json(args.out, res)
    lines = [
        "# In-context segmentation (phantom CXR, no weight update at test time)",
        "",
        f"Trained on {res['setup']['train_labels']} for {args.steps} steps at {args.size} px "
        f"({secs:.0f} s CPU); queries from the test split, references from the train split.",
        "",
        "| setting | Dice per structure |",
        "|---|---|",
    ]
    for key, v in res["results"].items():
        lines.append(f"| {key} | {', '.join(f'{n} {d:.3f}' for n, d in v.items())} |")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
