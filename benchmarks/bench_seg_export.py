"""Segmenter export: a MONAI UNet lung segmenter (real chest X-rays, `medfm segment train`'s library) exported
with ``medfm export`` to ONNX fp32, dynamic int8 and static QDQ int8 (calibrated on ~200 training images);
test-split Dice of PyTorch fp32, ONNX fp32 and each int8 variant, file sizes. Static int8 is also measured
per tensor (``per_channel=False``) and with the last convolution left in fp32, to see where the loss is.
Writes benchmarks/results/seg_export.json and .md. One CPU thread throughout (accuracy, not speed).

    .venv/bin/python benchmarks/bench_seg_export.py [--steps 600] [--size 128] [--n-calib 200]

The trained run is cached under benchmarks/work/seg_export/ (git-ignored) and reused when present.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from medfm.paths import shared_data_dir
from medfm.rundir import environment, write_json

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "work" / "seg_export"


def train_run(data: Path, size: int, steps: int, work: Path) -> tuple[Path, float | None]:
    """A MONAI-UNet "segmenter" run on the train split (both sites), reused when already trained."""
    from medfm.tasks.segment.train import SegTrainConfig, train_segmentation

    run = work / f"unet_{size}_s{steps}"
    if (run / "seg_model.safetensors").is_file():  # cached: the seconds its training took
        return run, json.loads((run / "metrics.json").read_text()).get("train_seconds")
    cfg = SegTrainConfig(data=str(data), decoder="monai_unet", img_size=size, steps=steps, batch_size=8,
                         lr=1e-3, flip=False, progress=False, class_names=["lung"])
    t = time.time()
    train_segmentation(cfg, run)
    return run, round(time.time() - t, 1)


def variant_rows(conf: dict) -> list[dict]:
    rows = []
    torch_dice = conf["variants"]["torch"]["test_dice"]
    for name, v in conf["variants"].items():
        rows.append({"variant": name, "file": v.get("file"), "bytes": v.get("bytes"),
                     "dice": v["test_dice"], "delta_vs_torch": v.get("test_dice_delta"),
                     "max_abs_logit_diff_calib": (v.get("max_abs_diff") or {}).get("calib")})
    assert rows[0]["dice"] == torch_dice or rows[0]["variant"] != "torch"
    return rows


def extra_static(conf: dict, folder: Path, run: Path, data: Path, n_calib: int, seed: int) -> list[dict]:
    """Static int8 per tensor, and per channel with the final conv excluded, measured like export_run's."""
    from medfm.export.quantize import quantize_static_int8
    from medfm.export.segment import seg_calibration, segmenter_dice
    from medfm.tasks.segment.runs import load_segmentation_run

    model, sconf = load_segmentation_run(run)
    calib = seg_calibration(sconf, str(data), n_calib, seed)
    fp32 = folder / conf["files"]["fp32"]
    rows = []
    for tag, kw in {"int8_static_per_tensor": {"per_channel": False},
                    "int8_static_last_conv_fp32": {"exclude_last": True},
                    "int8_static_per_tensor_last_conv_fp32": {"per_channel": False, "exclude_last": True}
                    }.items():
        p = quantize_static_int8(fp32, folder.parent / f"{folder.name}_{tag}.onnx", calib, **kw)
        dice = segmenter_dice(p, sconf, str(data))
        rows.append({"variant": tag, "file": p.name, "bytes": p.stat().st_size, "dice": dice,
                     "delta_vs_torch": {k: round(dice[k] - conf["variants"]["torch"]["test_dice"][k], 5)
                                        for k in dice}})
    return rows


def write_markdown(res: dict, path: Path) -> None:
    lines = [
        "# Segmenter export: MONAI UNet lung masks, ONNX fp32 / int8",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Data: {res['setup']['data']}; model: {res['setup']['model']}. Dice on the test split "
        f"({res['setup']['n_test']} images, at each image's own grid, argmax of the logits). int8 static: "
        f"QDQ, activations uint8 calibrated (MinMax) on {res['setup']['n_calib']} training images. "
        "One CPU thread (onnxruntime and torch); sizes in MiB.",
        "",
        "| variant | file | size MiB | Dice lung | Dice mean | delta (mean) | max logit diff (calib) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["variants"]:
        size = f"{r['bytes'] / 2**20:.3f}" if r.get("bytes") else "–"
        d = r["dice"]
        delta = (r.get("delta_vs_torch") or {}).get("mean")
        diff = r.get("max_abs_logit_diff_calib")
        lung = d.get("lung", float("nan"))
        lines.append(f"| {r['variant']} | {r.get('file') or '–'} | {size} | {lung:.4f} | "
                     f"{d['mean']:.4f} | {'–' if delta is None else f'{delta:+.4f}'} | "
                     f"{'–' if diff is None else f'{diff:.3g}'} |")
    lines += ["", f"Goal: int8 Dice delta <= 0.005. {res['verdict']}", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(shared_data_dir() / "cxr_lung_seg"))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--n-calib", type=int, default=200)
    ap.add_argument("--workdir", default=str(WORK))
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "seg_export.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data, work = Path(args.data), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    run, train_s = train_run(data, args.size, args.steps, work)
    print(f"run: {run.name} (train {train_s} s)", flush=True)
    if args.train_only:
        return
    from medfm.export import export_run

    folder = work / f"export_{run.name}"
    t = time.time()
    conf = export_run(run, folder, calib_store=str(data), n_calib=args.n_calib, threads=1)
    export_s = round(time.time() - t, 1)
    rows = variant_rows(conf) + extra_static(conf, folder, run, data, args.n_calib, 0)
    best = min((r for r in rows if r["variant"].startswith("int8")),
               key=lambda r: abs(r["delta_vs_torch"]["mean"]))
    ok = abs(best["delta_vs_torch"]["mean"]) <= 0.005
    st = next(r for r in rows if r["variant"] == "int8_static")
    verdict = (f"Default static int8 (per channel): delta {st['delta_vs_torch']['mean']:+.4f}; best int8 "
               f"variant {best['variant']}: {best['delta_vs_torch']['mean']:+.4f} -> "
               f"{'met' if ok else 'missed'}.")
    res = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_seg_export.py",
                             *map(shlex.quote, sys.argv[1:])]),
        "setup": {"data": "cxr_lung_seg (Shenzhen + Montgomery chest X-rays, lung masks), train split for "
                          "training and calibration, test split for Dice",
                  "model": f"MONAI UNet via medfm segment train, {args.size} px, {args.steps} steps x "
                           "batch 8, no flips", "size": args.size, "steps": args.steps,
                  "train_seconds": train_s,
                  "n_calib": conf["calibration"]["images"], "n_test": conf["test"]["images"],
                  "export_seconds": export_s, "threads": 1, "environment": environment()},
        "variants": rows, "verdict": verdict, "export_config_variants": conf["variants"],
    }
    write_json(args.out, res)
    write_markdown(res, Path(args.out).with_suffix(".md"))
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
