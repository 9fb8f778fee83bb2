"""3D segmentation sanity benchmark: training on patches + MONAI sliding-window inference on whole volumes.

A. Real MRI: FLAIR + lesion label map (volumes_3d/nifti). One volume only, so train on the left half
   (x < W/2) and evaluate on the right half (never seen) with sliding windows; spacing from the NIfTI header.
B. Chest-CT phantoms (`medfm data phantom --kind ct3d`): train split -> test split, organs.
Writes benchmarks/results/seg3d.json and seg3d.md. CPU defaults: 32^3 patches, a few hundred steps.

    .venv/bin/python benchmarks/bench_seg3d.py [--ct-data DIR] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from medfm.paths import shared_data_dir
from medfm.rundir import environment, write_json
from medfm.tasks.segment.data import SegPairs, csv_spec, load_pairs, read_image, read_mask
from medfm.tasks.segment.infer import evaluate_model
from medfm.tasks.segment.train import SegTrainConfig, build_model, fit

RESULTS = Path(__file__).parent / "results"


def flair_halves() -> tuple[SegPairs, SegPairs, int]:
    root = shared_data_dir() / "volumes_3d" / "nifti"
    # the same reader and normalisation as `medfm data prepare` (volumes keep their grid)
    img, spacing, _, aff, _ = read_image(root / "FLAIR.nii.gz", csv_spec(None))
    m = read_mask(root / "lesion.nii.gz")
    half = img.shape[-1] // 2

    def pairs(sl: slice, tag: str) -> SegPairs:
        i, mm = img[..., sl].contiguous(), m[..., sl].contiguous()
        return SegPairs(i[None], mm[None], [mm], [spacing], [f"flair_{tag}"], [], [aff], [True])

    return pairs(slice(0, half), "left"), pairs(slice(half, None), "right"), int(m.max()) + 1


def run(method: str, train: SegPairs, test: SegPairs, k: int, patch: list[int], steps: int, names) -> dict:
    cfg = SegTrainConfig(
        encoder="vit_tiny",
        encoder_kwargs=dict(embed_dim=96, depth=4, num_heads=3, patch_size=16),
        decoder="monai_unet" if method == "monai_unet" else "auto",
        steps=steps,
        batch_size=2,
        lr=2e-3,
        encoder_lr_scale=1.0,
        progress=False,
        feature_size=8,
    )
    torch.manual_seed(0)
    model = build_model(cfg, 3, 1, patch, k)
    secs = fit(model, train, patch, cfg)
    t = time.time()
    res = evaluate_model(model, test, k, roi_size=patch, class_names=names)
    return {
        "method": method,
        "train_seconds": round(secs, 1),
        "infer_seconds": round(time.time() - t, 1),
        "metrics": res,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ct-data", default=None, help="ct3d phantom folder (generated into /tmp if absent)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--patch", type=int, default=32)
    ap.add_argument("--methods", default="monai_unet,vit_unetr")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "seg3d.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    patch = [args.patch] * 3
    res: dict = {"setup": {"steps": args.steps, "patch": patch, "environment": environment()}, "runs": []}
    train, test, k = flair_halves()
    names = [f"lesion_{i}" for i in range(1, k)]
    for method in args.methods.split(","):
        row = {
            "data": "FLAIR+lesion (train left half, test right half)",
            **run(method, train, test, k, patch, args.steps, names),
        }
        print(json.dumps(row), flush=True)
        res["runs"].append(row)
        write_json(args.out, res)
    ct = Path(args.ct_data) if args.ct_data else Path("/tmp/medfm_bench_ct3d")
    if not (ct / "manifest.csv").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "medfm.cli.app",
                "data",
                "phantom",
                "--kind",
                "ct3d",
                "--n",
                "10",
                "--size",
                "48",
                "--out",
                str(ct),
            ],
            check=True,
        )
    labels = json.loads((ct / "dataset.json").read_text())["mask_labels"]
    tr, te = load_pairs(ct, "train", None, None), load_pairs(ct, "test", None, None)
    if len(te) == 0:
        te = load_pairs(ct, "val", None, None)
    kk = max(int(x) for x in labels) + 1
    for method in args.methods.split(","):
        row = {
            "data": f"ct3d phantom ({len(tr)} train, {len(te)} test volumes)",
            **run(method, tr, te, kk, patch, args.steps, [labels[str(i)] for i in range(1, kk)]),
        }
        print(json.dumps(row), flush=True)
        res["runs"].append(row)
        write_json(args.out, res)
    lines = [
        "# 3D segmentation sanity benchmark",
        "",
        f"steps {args.steps}, patch {patch}, CPU",
        "",
        "| data | method | mean Dice | mean HD95 mm | per class Dice | train s | infer s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        m = r["metrics"]
        per = ", ".join(f"{n} {v['dice']:.2f}" for n, v in m.items() if n != "mean")
        lines.append(
            f"| {r['data']} | {r['method']} | {m['mean']['dice']:.3f} | {m['mean']['hd95_mm']:.1f} | {per} | "
            f"{r['train_seconds']} | {r['infer_seconds']} |"
        )
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
