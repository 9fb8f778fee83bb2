"""Inference benchmark ("Fast and small"): a ResNet-18 and a ViT-S classifier on BreastMNIST (28 px),
trained from scratch, then served as fp32 eager, bf16 eager (``torch.autocast`` cpu bf16), ONNX fp32,
ONNX int8 (static QDQ calibrated on the train split; dynamic int8), pruned (>= 25 % fewer MACs,
``medfm.compress.prune``) and a distilled narrow student (``medfm.compress.distill``). Per variant: file
size, test AUROC, batch-1 latency p50/p95 and batch-32 throughput on 2 threads (torch.set_num_threads(2),
onnxruntime intra_op_num_threads=2). Writes benchmarks/results/inference.{json,md}.

    .venv/bin/python benchmarks/bench_inference.py [--size 28] [--steps 200] [--vit-patch 7] \
        [--prune-steps 100] [--distill-steps 300] [--models resnet18,vit_small]

Trained, pruned, distilled and exported runs are cached under benchmarks/work/inference/ (git-ignored) and
reused when present. Results are written after each model, so an interrupted run still leaves a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("MEDFM_PROGRESS", "0")

from medfm.paths import shared_data_dir  # noqa: E402
from medfm.rundir import environment, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).parent / "work" / "inference"
THREADS = 2
MIB = 1024 * 1024


def prepare_data(size: int) -> Path:
    from medfm.data.prepare import PrepareConfig, prepare

    out = WORK / f"breastmnist_{size}"
    if not (out / "summary.json").is_file():
        src = shared_data_dir() / "medmnist" / "breastmnist.npz"
        prepare(f"medmnist:{src}", out, PrepareConfig(size=size), progress=False)
    return out


def encoder_kwargs(model: str, size: int, patch: int) -> dict[str, Any]:
    if model.startswith("resnet"):
        return {"img_size": size, "in_chans": 1, "small_input": True}
    return {"img_size": size, "in_chans": 1, "patch_size": patch}


def student_of(model: str, patch: int) -> tuple[str, dict[str, Any]]:
    """A narrow student of the same family: ResNet-18 at width 16, ViT-Tiny (6 blocks)."""
    if model.startswith("resnet"):
        return "resnet18", {"width": 16, "small_input": True}
    return "vit_tiny", {"patch_size": patch, "depth": 6}


def _timed_cache(path: Path) -> dict[str, Any]:
    f = path.parent / f"{path.name}.bench.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _save_timing(path: Path, info: dict[str, Any]) -> None:
    write_json(path.parent / f"{path.name}.bench.json", info)


def train(model: str, data: Path, size: int, patch: int, steps: int, precision: str) -> tuple[Path, dict]:
    """A from-scratch classifier run (``scratch`` adapter, best-val checkpoint), cached."""
    from medfm.models.registry import create_encoder
    from medfm.tasks.adapt.runner import AdaptConfig
    from medfm.tasks.adapt.single import fit_classifier

    run = WORK / f"{model}_{size}_s{steps}_{precision}"
    if (run / "config.json").is_file() and (run / "head.safetensors").is_file():
        return run, _timed_cache(run)
    torch.manual_seed(0)
    enc = create_encoder(model, **encoder_kwargs(model, size, patch))
    cfg = AdaptConfig(methods=["scratch"], steps=steps, min_steps=steps, max_steps=steps, precision=precision,
                      save_adapters=False)
    t = time.time()
    fit_classifier(enc, data, run, method="scratch", cfg=cfg)
    info = {"train_s": round(time.time() - t, 1), "steps": steps, "precision": precision,
            "encoder_kwargs": encoder_kwargs(model, size, patch)}
    _save_timing(run, info)
    return run, info


def prune(run: Path, data: Path, steps: int) -> tuple[Path, dict]:
    from medfm.compress.prune import prune_classifier

    out = run.parent / f"{run.name}_pruned25_s{steps}"
    if (out / "config.json").is_file():
        return out, _timed_cache(out)
    t = time.time()
    s = prune_classifier(run, data, out, target_macs_reduction=0.25, finetune_steps=steps)
    info = {"prune_s": round(time.time() - t, 1), **{k: v for k, v in s.items() if k not in ("model", "out")}}
    _save_timing(out, info)
    return out, info


def distil(run: Path, data: Path, model: str, patch: int, steps: int) -> tuple[Path, dict]:
    from medfm.compress.distill import distill

    student, kw = student_of(model, patch)
    out = run.parent / f"{run.name}_distill_{student}_s{steps}"
    if (out / "config.json").is_file():
        return out, _timed_cache(out)
    t = time.time()
    s = distill(run, data, out, student=student, student_kwargs=kw, steps=steps)
    info = {"distill_s": round(time.time() - t, 1), "student_kwargs": kw,
            **{k: v for k, v in s.items() if k not in ("model", "out")}}
    _save_timing(out, info)
    return out, info


def export(run: Path, data: Path) -> tuple[Path, dict]:
    from medfm.export.run import export_run

    out = run.parent / f"{run.name}_onnx"
    if (out / "config.json").is_file():
        return out, json.loads((out / "config.json").read_text())
    t = time.time()
    conf = export_run(run, out, int8=True, calib_store=str(data), threads=THREADS)
    conf["export_s"] = round(time.time() - t, 1)
    return out, conf


def latency(fn, x: np.ndarray, n1: int, n32: int, warmup: int = 5) -> dict[str, float]:
    """Batch-1 p50/p95 (ms) over ``n1`` calls and batch-32 throughput (images/s) over ``n32`` calls."""
    for i in range(warmup):
        fn(x[i:i + 1])
    t1 = []
    for i in range(n1):
        j = i % len(x)
        t = time.perf_counter()
        fn(x[j:j + 1])
        t1.append(time.perf_counter() - t)
    b32 = [x[(k * 32) % (len(x) - 32):(k * 32) % (len(x) - 32) + 32] for k in range(n32)]
    fn(b32[0])
    fn(b32[-1])
    t = time.perf_counter()
    for b in b32:
        fn(b)
    el = time.perf_counter() - t
    ms = np.asarray(t1) * 1e3
    return {"b1_p50_ms": float(np.percentile(ms, 50)), "b1_p95_ms": float(np.percentile(ms, 95)),
            "b32_img_s": 32 * n32 / el, "n_b1": n1, "n_b32": n32}


def predict_all(fn, x: np.ndarray, bs: int = 32) -> np.ndarray:
    return np.concatenate([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def torch_fn(run: Path, bf16: bool = False):
    from medfm.tasks.adapt.classifier import load_classifier

    clf = load_classifier(run).eval()

    def fn(x: np.ndarray) -> np.ndarray:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with torch.inference_mode(), ctx:
            return clf(torch.from_numpy(x)).float().numpy()

    return fn, clf


def onnx_fn(folder: Path, variant: str):
    from medfm.export.session import load_exported

    m = load_exported(folder, variant, threads=THREADS)
    return m.run


def torch_bytes(run: Path) -> int:
    return sum(p.stat().st_size for p in run.glob("*.safetensors"))


def measure(name: str, fn, nbytes: int, x: np.ndarray, y: np.ndarray, task: str, args,
            extra: dict | None = None) -> dict[str, Any]:
    from medfm.export.run import auroc

    t = time.time()
    auc = auroc(task, y, predict_all(fn, x))
    row = {"variant": name, "bytes": int(nbytes), "size_mib": nbytes / MIB, "test_auroc": auc,
           "loadavg_before": os.getloadavg()[0]}
    row.update(latency(fn, x, args.n1, args.n32))
    row["loadavg_after"] = os.getloadavg()[0]
    row["measure_s"] = round(time.time() - t, 1)
    row.update(extra or {})
    print(f"  {name:22s} {row['size_mib']:7.2f} MiB auroc {auc:.4f} p50 {row['b1_p50_ms']:.2f} ms "
          f"p95 {row['b1_p95_ms']:.2f} ms b32 {row['b32_img_s']:.0f} img/s", flush=True)
    return row


def bench_model(model: str, data: Path, args) -> dict[str, Any]:
    from medfm.compress.common import macs_params
    from medfm.export.run import store_inputs

    t0 = time.time()
    run, tinfo = train(model, data, args.size, args.vit_patch, args.steps, args.precision)
    print(f"{model}: trained {run.name} ({tinfo.get('train_s')} s)", flush=True)
    exp, econf = export(run, data)
    print(f"{model}: exported ({econf.get('export_s')} s)", flush=True)
    pr, pinfo = prune(run, data, args.prune_steps)
    print(f"{model}: pruned ({pinfo.get('prune_s')} s, -{pinfo.get('macs_reduction', 0):.1%} MACs)",
          flush=True)
    st, sinfo = distil(run, data, model, args.vit_patch, args.distill_steps)
    print(f"{model}: distilled ({sinfo.get('distill_s')} s)", flush=True)

    fp32_fn, clf = torch_fn(run)
    task = json.loads((run / "config.json").read_text())["task"]
    x, y = store_inputs(data, clf.encoder, "test", 10**9)
    macs0, params0 = macs_params(clf, clf.encoder)
    size0 = torch_bytes(run)
    rows = [measure("fp32 eager", fp32_fn, size0, x, y, task, args, {"macs": macs0, "params": params0})]
    rows.append(measure("bf16 eager (autocast)", torch_fn(run, bf16=True)[0], size0, x, y, task, args,
                        {"note": "weights stored fp32"}))
    files = econf["files"]
    labels = {"fp32": "ONNX fp32", "int8_static": "ONNX int8 static QDQ", "int8": "ONNX int8 dynamic"}
    for v in ("fp32", "int8_static", "int8"):
        if v in files:
            vi = econf["variants"][v]
            rows.append(measure(labels[v], onnx_fn(exp, v), vi["bytes"], x, y, task, args,
                                {"export_test_auroc": vi.get("test_auroc"),
                                 "max_abs_diff": vi.get("max_abs_diff")}))
    p_fn, p_clf = torch_fn(pr)
    pm, pp = macs_params(p_clf, p_clf.encoder)
    rows.append(measure("pruned (-25 % MACs) eager", p_fn, torch_bytes(pr), x, y, task, args,
                        {"macs": pm, "params": pp, "macs_reduction": 1 - pm / macs0}))
    s_fn, s_clf = torch_fn(st)
    sm, sp = macs_params(s_clf, s_clf.encoder)
    rows.append(measure(f"distilled {sinfo.get('distillation', {}).get('student', 'student')} eager", s_fn,
                        torch_bytes(st), x, y, task, args,
                        {"macs": sm, "params": sp, "student_kwargs": student_of(model, args.vit_patch)[1]}))
    base = rows[0]
    for r in rows:
        r["delta_auroc"] = None if r["test_auroc"] is None else r["test_auroc"] - base["test_auroc"]
        r["speedup_b1"] = base["b1_p50_ms"] / r["b1_p50_ms"]
        r["speedup_b32"] = r["b32_img_s"] / base["b32_img_s"]
    return {"model": model, "encoder_kwargs": encoder_kwargs(model, args.size, args.vit_patch),
            "runs": {"trained": run.name, "export": exp.name, "pruned": pr.name, "distilled": st.name},
            "train": tinfo, "prune": pinfo, "distill": sinfo,
            "export": {k: econf.get(k) for k in ("variants", "calibration", "export_s")},
            "rows": rows, "total_s": round(time.time() - t0, 1)}


def _row(rows: list[dict], prefix: str) -> dict | None:
    return next((r for r in rows if r["variant"].startswith(prefix)), None)


def goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for model, m in res["models"].items():
        rows, cnn = m["rows"], model.startswith("resnet")
        fp32, ofp = rows[0], _row(rows, "ONNX fp32")
        for v in ("ONNX int8 static", "ONNX int8 dynamic"):
            r = _row(rows, v)
            if r is None:
                continue
            d = r["delta_auroc"]
            out.append({"model": model, "goal": f"{v}: AUROC within 0.01 of fp32",
                        "met": d is not None and abs(d) <= 0.01, "value": f"ΔAUROC {d:+.4f}"})
            ratio = ofp["bytes"] / r["bytes"]
            out.append({"model": model, "goal": f"{v}: >= 3.5x smaller than ONNX fp32",
                        "met": ratio >= 3.5, "value": f"{ratio:.2f}x ({ofp['size_mib']:.2f} -> "
                        f"{r['size_mib']:.2f} MiB)"})
            if cnn:
                out.append({"model": model, "goal": f"{v}: >= 1.5x faster than fp32 eager at batch 1",
                            "met": r["speedup_b1"] >= 1.5,
                            "value": f"{r['speedup_b1']:.2f}x ({fp32['b1_p50_ms']:.2f} -> "
                            f"{r['b1_p50_ms']:.2f} ms p50; vs ONNX fp32 "
                            f"{ofp['b1_p50_ms'] / r['b1_p50_ms']:.2f}x)"})
            else:
                out.append({"model": model, "goal": f"{v}: not slower than fp32 eager at batch 1",
                            "met": r["b1_p50_ms"] <= fp32["b1_p50_ms"],
                            "value": f"{fp32['b1_p50_ms']:.2f} -> {r['b1_p50_ms']:.2f} ms p50 "
                            f"(vs ONNX fp32 {ofp['b1_p50_ms']:.2f} ms)"})
        p = _row(rows, "pruned")
        if p is not None:
            d = p["delta_auroc"]
            out.append({"model": model, "goal": "pruned: >= 25 % fewer MACs, AUROC within 0.02",
                        "met": p["macs_reduction"] >= 0.25 - 1e-9 and d is not None and abs(d) <= 0.02,
                        "value": f"-{p['macs_reduction']:.1%} MACs, ΔAUROC {d:+.4f}"})
    return out


def write_md(res: dict[str, Any]) -> str:
    lines = ["# Inference: latency, throughput, size and AUROC (BreastMNIST, 2 CPU threads)", "",
             res["description"], "", f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']}; loadavg (1 min) at start {res['loadavg_start'][0]:.2f}, "
             f"at end {res.get('loadavg_end', [float('nan')])[0]:.2f}.", ""]
    for model, m in res["models"].items():
        t = m["train"]
        lines += [f"## {model} ({json.dumps(m['encoder_kwargs'])})", "",
                  f"Trained from scratch: {t.get('steps')} steps, batch 32, precision {t.get('precision')} "
                  f"({t.get('train_s')} s). Pruned: -{m['prune'].get('macs_reduction', 0):.1%} MACs, "
                  f"{m['prune'].get('pruning', {}).get('finetune_steps')} fine-tune steps. "
                  f"Distilled student: {m['distill'].get('distillation', {}).get('student')} "
                  f"{json.dumps(m['distill'].get('student_kwargs'))}, "
                  f"{m['distill'].get('distillation', {}).get('steps')} steps.", "",
                  "| variant | size MiB | test AUROC | ΔAUROC | b1 p50 ms | b1 p95 ms | b32 img/s "
                  "| speed-up vs fp32 eager (b1 / b32) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in m["rows"]:
            d = "" if r["delta_auroc"] is None else f"{r['delta_auroc']:+.4f}"
            lines.append(f"| {r['variant']} | {r['size_mib']:.2f} | {r['test_auroc']:.4f} | {d} | "
                         f"{r['b1_p50_ms']:.2f} | {r['b1_p95_ms']:.2f} | {r['b32_img_s']:.0f} | "
                         f"{r['speedup_b1']:.2f}x / {r['speedup_b32']:.2f}x |")
        lines.append("")
    lines += ["## Goals", ""]
    for g in res["goals"]:
        lines.append(f"- {g['model']}, {g['goal']}: **{'met' if g['met'] else 'missed'}** ({g['value']})")
    lines += ["", "Sizes: safetensors (encoder + head) for torch variants (bf16 runs the fp32 weights under "
              "autocast), the .onnx file for ONNX. AUROC on the test split (156 images) from the same "
              "float inputs for every variant. int8 static: QDQ, calibrated on 256 train images "
              "(medfm.export.export_run).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--steps", type=int, default=200, help="training steps per model (batch 32)")
    ap.add_argument("--precision", default="32", help="training precision (32 | bf16-mixed)")
    ap.add_argument("--vit-patch", type=int, default=7)
    ap.add_argument("--prune-steps", type=int, default=100)
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--n1", type=int, default=100, help="batch-1 timed calls")
    ap.add_argument("--n32", type=int, default=10, help="batch-32 timed calls")
    ap.add_argument("--models", default="resnet18,vit_small")
    ap.add_argument("--out", type=Path, default=RESULTS / "inference")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    WORK.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.size)
    res: dict[str, Any] = {
        "description": f"BreastMNIST ({args.size} px, official split 546/78/156), classifiers trained from "
                       f"scratch on this CPU; every timing on {THREADS} threads (torch.set_num_threads, "
                       f"onnxruntime intra_op_num_threads), 5 warm-up calls, {args.n1} batch-1 calls "
                       f"(p50/p95), {args.n32} batch-32 calls (throughput).",
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "args": {k: str(v) for k, v in vars(args).items()}, "threads": THREADS,
        "machine": f"{os.cpu_count()} CPUs", "loadavg_start": list(os.getloadavg()),
        "environment": environment(), "data": str(data), "models": {}}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        res["models"][model] = bench_model(model, data, args)
        res["loadavg_end"] = list(os.getloadavg())
        res["goals"] = goals(res)
        write_json(args.out.with_suffix(".json"), res)
        args.out.with_suffix(".md").write_text(write_md(res))
        print(f"wrote {args.out.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    main()
