"""Phantom nodule AUROC by nodule size, from the test predictions of `medfm adapt` runs or CLIP zero-shot.

Each size bin's positive cases are ranked against all nodule-free test cases, so a bin's AUROC says how
well nodules of that size are told apart from clean lungs. Also records mm per pixel (the phantom field
of view is 400 mm), so a bin's nodule diameter in pixels can be read off. Merges one entry per ``--key`` into
benchmarks/results/phantom_nodule_by_size.json and rewrites the .md table.

With ``--clip`` the run is a CLIP run (``medfm clip``): its zero-shot nodule scores on the test split, with
the prompt set (default / attributes / reports) that scores best on the val split, are stratified the same
way.

Example::

    .venv/bin/python benchmarks/bench_nodule_by_size.py --run runs/h9/probe_w32_128_max \\
        --data runs/h9/prep128 --key scratch_w32_128_max --label "ResNet-18 w32, 128 px, max pool"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score

RESULTS = Path(__file__).resolve().parent / "results" / "phantom_nodule_by_size.json"
FOV_MM = 400.0
BINS = ((0.0, 10.0), (10.0, 15.0), (15.0, 20.0), (20.0, 31.0))


def by_size(pred: pd.DataFrame, manifest: pd.DataFrame, score: str = "p_nodule") -> dict:
    """AUROC of ``score`` overall and per nodule-size bin (bin positives vs all negatives)."""
    df = pred.merge(manifest[["case_id", "nodule_size_mm"]], on="case_id", how="left")
    if df["nodule_size_mm"].isna().any():
        raise SystemExit("some predicted cases are missing from the manifest (wrong --data?)")
    y, p = df["y_nodule"].to_numpy().astype(int), df[score].to_numpy()
    neg = y == 0
    out = {"overall": {"auroc": round(float(roc_auc_score(y, p)), 4), "n_pos": int(y.sum()),
                       "n_neg": int(neg.sum())}}
    size = df["nodule_size_mm"].to_numpy(float)
    for lo, hi in BINS:
        pos = (y == 1) & (size >= lo) & (size < hi)
        if pos.sum() == 0:
            continue
        keep = pos | neg
        out[f"{lo:g}-{hi:g} mm"] = {"auroc": round(float(roc_auc_score(y[keep], p[keep])), 4),
                                    "n_pos": int(pos.sum())}
    return out


def clip_predictions(run: str | Path, data: str | Path) -> pd.DataFrame:
    """Test-split zero-shot nodule probabilities of a CLIP run, prompts selected on the val split."""
    from bench_vlm_quality import val_selected_prompts  # same prompt choice as the VLM quality benchmark
    from medfm.models.clip import load_clip
    from medfm.tasks.vlm.data import ImageTextDataset
    from medfm.tasks.vlm.retrieval import embed_dataset
    from medfm.tasks.vlm.zeroshot import evaluate_zeroshot

    model = load_clip(run)
    size = model.cfg.img_size
    val = ImageTextDataset(data, split="val", img_size=size)
    test = ImageTextDataset(data, split="test", img_size=size)
    train_texts = ImageTextDataset(data, split="train", img_size=size).texts
    prompts, _, _ = val_selected_prompts(model, val, ["nodule"], train_texts)
    zs = evaluate_zeroshot(model, None, prompts, img_emb=embed_dataset(model, test)[0])
    y = test.labels()[:, test.label_names.index("nodule")]
    return pd.DataFrame({"case_id": test.case_ids, "y_nodule": y, "p_nodule": zs["probs"][:, 0]})


def _table(res: dict) -> str:
    bins = [f"{lo:g}-{hi:g} mm" for lo, hi in BINS]
    lines = ["# phantom_nodule_by_size", "",
             "Nodule AUROC on the phantom CXR test split, each size bin's nodules against all nodule-free "
             "cases (n positives in brackets).", "",
             "| run | image px | overall | " + " | ".join(bins) + " |",
             "|---|---|---|" + "---|" * len(bins)]
    for v in res.values():
        cells = []
        for b in bins:
            c = v["auroc"].get(b)
            cells.append(f"{c['auroc']:.3f} ({c['n_pos']})" if c else "-")
        lines.append(f"| {v['label']} | {v['image_px']} | {v['auroc']['overall']['auroc']:.3f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Commands:", ""] + [f"- `{v['command']}`" for v in res.values()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="Output folder of `medfm adapt` (predictions.parquet), or "
                    "of `medfm clip` with --clip.")
    ap.add_argument("--clip", action="store_true", help="--run is a CLIP run: use zero-shot scores.")
    ap.add_argument("--data", required=True, help="The prepared phantom dataset the run was evaluated on.")
    ap.add_argument("--key", required=True, help="Result key.")
    ap.add_argument("--label", default="", help="Row label in the table.")
    ap.add_argument("--method", default="", help="Adapter rows to use (default: the only one).")
    ap.add_argument("--command", default="", help="The command that produced --run (recorded).")
    args = ap.parse_args()

    if args.clip:
        import torch

        torch.set_num_threads(2)
        pred = clip_predictions(args.run, args.data)
    else:
        pred = pd.read_parquet(Path(args.run) / "predictions.parquet")
    if args.method:
        pred = pred[pred["method"] == args.method]
    if "method" in pred and pred["method"].nunique() > 1:
        raise SystemExit(f"several methods in {args.run}: pass --method")
    data = Path(args.data)
    manifest = pd.read_parquet(data / "manifest.parquet")
    from medfm.data.summary import load_summary

    px = int(load_summary(data).image_shape[-1])
    res = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    auroc = by_size(pred, manifest)
    res[args.key] = {"label": args.label or args.key, "image_px": px, "mm_per_px": round(FOV_MM / px, 3),
                     "auroc": auroc, "run": args.run, "command": args.command or f"(adapt run {args.run})"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(_table(res))
    print(json.dumps(auroc, indent=1))


if __name__ == "__main__":
    main()
