"""Shared steps of the label-efficiency benchmarks (benchmarks/bench_breastmnist.py, bench_tb.py).

prepare real data (medfm.data.prepare, as `medfm data prepare`) -> pool the unlabelled training images
into one store -> MAE pretraining (medfm.train.trainer, as `medfm pretrain mae`) -> every method x label
budget x seed with medfm.tasks.adapt -> JSON + markdown tables. Benchmarks only: not part of the package.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.store import load_summary, read_manifest, shard_name
from medfm.data.store_writer import StoreWriter
from medfm.data.summary import Summary
from medfm.errors import InputError


def prepare(src: str | Path, out: Path, size: int, labels: str | None = None) -> Path:
    """`medfm data prepare SRC --out OUT --size SIZE [--labels L]` (same defaults); skipped when done."""
    from medfm.data.prepare import PrepareConfig
    from medfm.data.prepare import prepare as prepare_store

    if not (out / "summary.json").is_file():
        cfg = PrepareConfig(size=size, labels=[c.strip() for c in labels.split(",")] if labels else None)
        summary = prepare_store(src, out, cfg)
        if summary["n_cases"] == 0:
            raise InputError(src, f"no case could be prepared ({summary['n_skipped']} skipped)")
    return out


def merge_pool(prepared: list[Path], out: Path, splits: tuple[str, ...] = ("train",)) -> Path:
    """One unlabelled prepared dataset from the given splits of several prepared datasets (same image size).

    Only training splits go in, so no evaluation image is seen during pretraining.
    """
    if (out / "summary.json").is_file():
        return out
    arrays, rows = [], []
    for root in prepared:
        m = read_manifest(root)
        m = m[m["split"].isin(splits)]
        shards: dict[int, np.ndarray] = {}
        for r in m.itertuples(index=False):
            s = int(r.shard)
            if s not in shards:
                shards[s] = np.load(root / "images" / shard_name(s), mmap_mode="r")
            arrays.append(np.asarray(shards[s][int(r.index)]))
            rows.append({"case_id": f"{root.name}/{r.case_id}", "patient_id": f"{root.name}/{r.patient_id}",
                         "site": root.name})
    images = np.stack(arrays)
    df = pd.DataFrame(rows)
    df["shard"], df["index"], df["split"] = 0, np.arange(len(df)), "train"
    for c in ("study_id", "sex", "report", "source", "orig_shape", "orig_spacing"):
        df[c] = ""
    df["age"], df["has_mask"] = np.nan, False
    writer = StoreWriter(out)
    writer.write_shard(0, images)
    writer.write_manifest(df)
    first = load_summary(prepared[0])
    writer.write_summary(Summary(
        format_version=first.format_version, n_cases=int(len(df)), spatial_dims=2,
        image_shape=list(images.shape[1:]), image_dtype=str(images.dtype), n_shards=1,
        shard_size=int(len(df)), preprocessing=first.preprocessing,
        extra={"sources": [p.name for p in prepared]}))
    return out


def pretrain(pool: Path, run: Path, steps: int, img_size: int, patch_size: int, encoder_args: str,
             batch_size: int = 64) -> Path:
    """`medfm pretrain mae POOL --encoder vit_tiny ... --workers 0 --split train` as a library call."""
    from medfm.train.config import PretrainConfig
    from medfm.train.trainer import run_pretrain

    if not (run / "model.safetensors").is_file() or not (run / "metrics.json").is_file():
        cfg = PretrainConfig(objective="mae", data=[str(pool)], split="train", out=str(run),
                             encoder="vit_tiny", img_size=img_size, patch_size=patch_size,
                             encoder_kwargs=json.loads(encoder_args), steps=steps, batch_size=batch_size,
                             workers=0)
        run_pretrain(cfg)
    return run


def label_efficiency(run: Path, data: Path, out: Path, methods: list[str], fractions: str, shots: str,
                     seeds: int, steps: int = 0, batch_size: int = 32, progress=None,
                     **adapt_kw) -> pd.DataFrame:
    """Every method x budget x seed; ``steps`` 0 = the epoch budget of AdaptConfig; ``adapt_kw`` overrides."""
    import medfm
    from medfm.tasks.adapt import AdaptConfig, parse_budgets, run_adapt

    cfg = AdaptConfig(methods=methods, budgets=parse_budgets(fractions, shots), seeds=seeds, steps=steps,
                      batch_size=batch_size, save_adapters=False, **adapt_kw)
    return run_adapt(medfm.load_encoder(run), data, out, cfg, source=str(run), progress=progress)


def label_efficiency_split(run: Path, data: Path, out: Path, methods: list[str], fractions: str, shots: str,
                           seeds: int, trained_seeds: int, steps: int = 0, **adapt_kw) -> pd.DataFrame:
    """Frozen-feature methods with ``seeds`` seeds, trained ones (finetune/lora/scratch) with
    ``trained_seeds``: the trained ones cost minutes per run on a CPU, the feature ones milliseconds."""
    from medfm.tasks.adapt.registry import ADAPTERS

    feat = [m for m in methods if getattr(ADAPTERS.get(m), "uses_features", False)]
    trained = [m for m in methods if m not in feat]
    parts = []
    if feat:
        parts.append(label_efficiency(run, data, out / "features_methods", feat, fractions, shots, seeds,
                                      steps, **adapt_kw))
    if trained:
        parts.append(label_efficiency(run, data, out / "trained_methods", trained, fractions, shots,
                                      trained_seeds, steps, **adapt_kw))
    return pd.concat(parts, ignore_index=True)


def recipe(steps: int, epochs: float, min_steps: int = 150, max_steps: int = 1500, patience: int = 15,
           **adapt_kw) -> str:
    """One line describing the finetune / lora / scratch budget, for the results' description."""
    from medfm.tasks.adapt import AdaptConfig

    c = AdaptConfig(steps=steps, epochs=epochs, min_steps=min_steps, max_steps=max_steps, patience=patience,
                    **adapt_kw)
    budget = (f"{steps} steps" if steps else
              f"{epochs:g} epochs (min {c.min_steps}, max {c.max_steps} steps), best-val-AUROC checkpoint, "
              f"early stopping (patience {c.patience} epochs)")
    return (f"finetune/lora/scratch: {budget}, batch {c.batch_size}, AdamW + warm-up + cosine, augment "
            f"{c.augment}, label smoothing {c.label_smoothing}, lr encoder {c.lr_finetune:g} (layer decay "
            f"{c.layer_decay}), head {c.lr_head:g}, lora {c.lr_lora:g}, scratch {c.lr_scratch:g}")


def mae_steps(run: Path, default: int) -> int:
    """The step count a pretraining run actually reached (its metrics.json), else ``default``."""
    try:
        return int(json.loads((Path(run) / "metrics.json").read_text())["steps"])
    except (OSError, KeyError, ValueError):
        return default


def table(results: pd.DataFrame) -> pd.DataFrame:
    """mean ± sd of AUROC and accuracy per method and label budget."""
    g = results.groupby(["method", "regime", "budget"])
    t = g.agg(n_labels=("n_labels", "mean"), auroc_mean=("auroc", "mean"), auroc_sd=("auroc", "std"),
              acc_mean=("accuracy", "mean"), acc_sd=("accuracy", "std"), seeds=("seed", "nunique"),
              time_s=("time_s", "sum")).reset_index()
    return t


def _sd(sd: float) -> str:
    """" ± sd", or nothing for a single seed (an sd of 0.000 there would look like a measurement)."""
    return "" if sd != sd else f" ± {sd:.3f}"


def write_results(name: str, results: pd.DataFrame, out_dir: Path, meta: dict,
                  published: dict[str, dict[str, float]] | None = None) -> tuple[Path, Path]:
    """benchmarks/results/<name>.json (+ .md): the label-efficiency table with the run's facts, and the
    paired differences against the from-scratch method (the first method named ``scratch...``) when the
    results have one."""
    from medfm.eval.paired import paired_differences

    t = table(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"{name}.json"
    runs = results.drop(columns=["info"], errors="ignore").to_dict(orient="records")
    ref = next((m for m in sorted(set(results.get("method", []))) if str(m).startswith("scratch")), None)
    paired = paired_differences(results, ref) if ref else pd.DataFrame()
    js.write_text(json.dumps({"benchmark": name, **meta, "published": published or {},
                              "table": t.to_dict(orient="records"), "runs": runs,
                              "paired_reference": ref, "paired": paired.to_dict(orient="records")},
                             indent=2, default=str))
    lines = [f"# {name}", "", f"{meta.get('description', '')}", "",
             "| method | labels | n_labels | test AUROC (mean ± sd) | test ACC (mean ± sd) | seeds |",
             "|---|---|---|---|---|---|"]
    order = {"fraction": 0, "shots": 1}
    for r in sorted(t.to_dict(orient="records"),
                    key=lambda r: (order[r["regime"]], r["budget"], r["method"])):
        lab = f"{100 * r['budget']:g}%" if r["regime"] == "fraction" else f"{int(r['budget'])}-shot"
        lines.append(f"| {r['method']} | {lab} | {r['n_labels']:.0f} | "
                     f"{r['auroc_mean']:.3f}{_sd(r['auroc_sd'])} | {r['acc_mean']:.3f}{_sd(r['acc_sd'])} | "
                     f"{r['seeds']} |")
    for k, v in (published or {}).items():
        lines.append(f"| {k} (published) | 100% | – | {v.get('auroc', float('nan')):.3f} | "
                     f"{v.get('acc', float('nan')):.3f} | – |")
    if len(paired):
        lines += ["", f"Paired by seed (same labelled subset) against {ref}: test AUROC difference.", "",
                  "| method | labels | pairs | mean diff | 95% CI | wins | p (Wilcoxon, one-sided) |",
                  "|---|---|---|---|---|---|---|"]
        for r in paired.to_dict(orient="records"):
            lab = f"{100 * r['budget']:g}%" if r["regime"] == "fraction" else f"{int(r['budget'])}-shot"
            ci = "–" if r["ci_low"] != r["ci_low"] else f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
            pv = "–" if r["p_greater"] != r["p_greater"] else f"{r['p_greater']:.3f}"
            lines.append(f"| {r['method']} | {lab} | {r['n']} | {r['mean_diff']:+.3f} | {ci} | "
                         f"{r['wins']}/{r['n']} | {pv} |")
    lines += ["", f"Measured on: {meta.get('machine', '')}; wall time {meta.get('wall_s', 0):.0f} s."]
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return js, md


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.perf_counter() - self.t0 - sum(self.marks.values()), 1)
