"""Run the label-efficiency protocol: every method × label budget × seed, on a prepared dataset.

Writes to ``out_dir`` (a run directory of kind "adapt"): results.csv/json (tidy: one row per run), summary.csv
(mean ± sd over seeds), predictions.parquet (test-set probabilities of every run), features/ (cached frozen
features), embeddings.npz (test features for the embedding map), adapters/ (LoRA), config.json, and with
``save_model`` model/ (the chosen classifier, a run of kind "classifier").
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from medfm.data.store import PreparedDataset, read_manifest, read_summary
from medfm.errors import ConfigError, InputError
from medfm.eval.metrics import classification_metrics, infer_task, youden_threshold
from medfm.rundir import RunDir
from medfm.tasks.adapt import linear
from medfm.tasks.adapt.features import cached_features, encoder_fingerprint
from medfm.tasks.adapt.partial import experiment_key, load_done, save_done
from medfm.tasks.adapt.protocol import Budget, sample_labelled
from medfm.tasks.adapt.registry import ADAPTERS

METRIC_KEYS = ["auroc", "accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity", "ece"]


@dataclass
class AdaptConfig:
    """Everything that defines an adaptation experiment (saved to config.json)."""

    methods: list[str] = field(default_factory=lambda: ["linear", "knn", "prototype"])
    budgets: list[Budget] = field(default_factory=lambda: [Budget("fraction", 0.1), Budget("fraction", 1.0)])
    seeds: int = 3
    first_seed: int = 0  # seeds are first_seed .. first_seed + seeds - 1 (lets extra seeds run in parallel)
    knn_k: int = 20
    proto_temperature: float = 0.0  # 0: chosen on val by log-loss
    c_grid: tuple[float, ...] = linear.C_GRID
    # finetune / lora / scratch share this budget and recipe (medfm.tasks.adapt.finetune.train_classifier)
    steps: int = 0  # > 0: exactly this many steps; 0: ``epochs`` over the labelled set, clamped below
    epochs: float = 60.0
    min_steps: int = 150  # tiny label sets still get enough updates (and are never stopped earlier)
    max_steps: int = 1500
    batch_size: int = 32
    lr_finetune: float = 5e-4  # top encoder block; lower blocks get layer_decay**depth of it
    layer_decay: float = 0.75
    lr_head: float = 2e-3
    lr_lora: float = 2e-3
    lr_scratch: float = 1e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    augment: str = "auto"  # auto (by modality: flips for ultrasound, not for X-ray) | light | flip | none
    select_on_val: bool = True  # restore the best-val-AUROC checkpoint
    eval_every: int = 0  # steps between val evaluations; 0: once per epoch
    patience: int = 15  # val evaluations without improvement before stopping
    lora_r: int = 8
    # "youden": chosen on val by Youden's J, applied to test (binary; per label for multi-label), because a
    # fixed 0.5 collapses to "all positive" when the training labels are imbalanced; or a fixed number
    threshold: str = "youden"
    splits: tuple[str, str, str] = ("train", "val", "test")
    save_adapters: bool = True
    save_model: bool = True  # the best method's model at the largest budget -> OUT/model (classifier run)
    feature_batch_size: int = 64
    # finetune / lpft / lora / scratch train and predict, and frozen features are computed, under this
    # precision (32 | bf16-mixed | 16-mixed; features are float32 either way); compile: torch.compile them
    precision: str = "32"
    compile: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ADAPTERS]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(ADAPTERS.names())}")
        if self.threshold != "youden":
            try:
                float(self.threshold)
            except ValueError as e:
                raise ConfigError(f"--threshold must be a number or 'youden', got {self.threshold!r}") from e
        if self.seeds < 1 or self.first_seed < 0:
            raise ConfigError("--seeds must be >= 1 and --first-seed >= 0")
        from medfm.tasks.adapt.finetune import AUGMENT_PRESETS

        if self.augment != "auto" and self.augment not in AUGMENT_PRESETS:
            raise ConfigError(f"--augment must be auto or one of {', '.join(AUGMENT_PRESETS)}, "
                              f"got {self.augment!r}")
        if self.steps < 0 or self.epochs <= 0 or self.min_steps < 0 or self.max_steps < 1:
            raise ConfigError("--steps must be >= 0, --epochs > 0, --min-steps >= 0, --max-steps >= 1")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        from medfm.train.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be 32, bf16-mixed or 16-mixed, got '{self.precision}'")


@dataclass
class AdaptContext:
    """What a method sees: the encoder, images/labels/patients per split, cached features, the config."""

    encoder: nn.Module
    task: str
    n_out: int
    label_names: list[str]
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    patients: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    cfg: AdaptConfig
    adapter_dir: Path | None = None
    on_step: Any = None
    modality: str | None = None  # from the prepared dataset's summary; picks the augmentation
    fingerprint: str = ""  # of the frozen encoder (cache and experiment key)


def _load_split(root: Path, split: str) -> PreparedDataset:
    return PreparedDataset(root, split)


def load_splits(data_dir: str | Path, splits: tuple[str, str, str]) -> dict[str, PreparedDataset]:
    """The train/val/test datasets; without a val split, 15 % of train patients become val (seed 0)."""
    root = Path(data_dir)
    read_summary(root)
    present = set(read_manifest(root)["split"].dropna().astype(str))
    tr, va, te = splits
    for s in (tr, te):
        if s not in present:
            raise InputError(root, f"prepared dataset has no '{s}' split (splits present: {sorted(present)})")
    out = {"train": _load_split(root, tr), "test": _load_split(root, te)}
    if va in present:
        out["val"] = _load_split(root, va)
    else:
        ds = out["train"]
        pats = ds.manifest["patient_id"].astype(str).to_numpy()
        uniq = np.random.default_rng(0).permutation(np.unique(pats))
        val_p = set(uniq[: max(1, int(round(0.15 * len(uniq))))])
        is_val = np.array([p in val_p for p in pats])
        val = _load_split(root, tr)
        val.manifest = ds.manifest[is_val].reset_index(drop=True)
        ds.manifest = ds.manifest[~is_val].reset_index(drop=True)
        out["val"] = val
    if out["train"].labels() is None:
        raise InputError(root, "prepared dataset has no label columns; adaptation needs labels")
    return out


def _images(ds: PreparedDataset) -> np.ndarray:
    return np.stack([ds.image_array(i) for i in range(len(ds))]) if len(ds) else np.zeros((0, 1, 1, 1))


def _task_of(ds: dict[str, PreparedDataset], labels: dict[str, np.ndarray]) -> tuple[str, int, list[str]]:
    summary = ds["train"].summary
    task = summary.get("task") or infer_task(np.concatenate([labels[s] for s in labels]))
    cols = list(ds["train"].label_columns)
    if task == "multilabel":
        return task, labels["train"].shape[1], cols
    n = int(max(int(labels[s].max()) for s in labels if len(labels[s])) + 1)
    col = cols[0] if cols else ""
    classes = (summary.get("classes") or summary.get("class_names")
               or (summary.get("label_classes") or {}).get(col))
    if isinstance(classes, list) and len(classes) >= n:
        names = [str(c) for c in classes]
    elif isinstance(classes, dict):
        names = [str(classes.get(str(k), k)) for k in range(n)]
    else:
        names = [str(k) for k in range(n)]
    if task == "binary" and n > 2:
        task = "multiclass"
    return task, max(n, 2), names


def _threshold(cfg: AdaptConfig, task: str, y_val: np.ndarray, p_val: np.ndarray):
    if cfg.threshold != "youden":
        return float(cfg.threshold)
    if task == "binary":
        return youden_threshold(y_val, p_val)
    if task == "multilabel":
        return [youden_threshold(y_val[:, j], p_val[:, j]) for j in range(y_val.shape[1])]
    return 0.5


def _pred_frame(run: dict, ds: PreparedDataset, y: np.ndarray, p: np.ndarray, task: str,
                names: list[str]) -> pd.DataFrame:
    m = ds.manifest
    df = pd.DataFrame({"case_id": m["case_id"].astype(str).to_numpy(),
                       "patient_id": m["patient_id"].astype(str).to_numpy() if "patient_id" in m else "",
                       "site": m["site"].astype(str).to_numpy() if "site" in m else ""})
    for k, v in run.items():
        df.insert(0, k, v)
    if task == "multilabel":
        for j, n in enumerate(names):
            df[f"y_{n}"] = y[:, j]
            df[f"p_{n}"] = p[:, j]
    elif task == "multiclass":
        df["y"] = y
        for j in range(p.shape[1]):
            df[f"p_{j}"] = p[:, j]
    else:
        df["y"] = y
        df["p"] = p
    return df


def _n_patients(ids: np.ndarray) -> int | float:
    """Distinct patients among ``ids``; NaN ("unknown") when the data has no patient ids, because then
    sampling is per image and a count of 1 would be wrong."""
    known = [str(p) for p in ids if str(p) not in ("", "nan", "None")]
    return len(set(known)) if known else math.nan


def planned_runs(cfg: AdaptConfig) -> list[tuple[Budget, int, str]]:
    """(budget, seed, method) of every run. With all labels (fraction 1.0) the label subset is the same for
    every seed, so a method whose result does not depend on the seed runs once (with the first seed)."""
    seed_ids = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    out = []
    for b in cfg.budgets:
        for s in seed_ids:
            for m in cfg.methods:
                if s != seed_ids[0] and b.regime == "fraction" and b.value >= 1.0 \
                        and getattr(ADAPTERS.get(m), "seed_independent", False):
                    continue
                out.append((b, s, m))
    return out


def one_run(base: AdaptContext, test_ds: PreparedDataset, out: Path, budget: Budget, seed: int,
            method: str, run_id: str) -> tuple[dict, pd.DataFrame, dict]:
    """Train/evaluate one (method, budget, seed): its result row, its test predictions and the method's
    output (val/test probabilities, info, and the trained ``head`` / ``encoder`` where it has them)."""
    cfg, task, names, labels, patients = base.cfg, base.task, base.label_names, base.labels, base.patients
    idx = sample_labelled(labels["train"], patients["train"], budget, seed)
    ctx = replace(base, adapter_dir=(out / "adapters" / run_id) if cfg.save_adapters else None)
    t0 = time.perf_counter()
    res = ADAPTERS.get(method)(ctx, idx, seed)
    elapsed = time.perf_counter() - t0
    thr = _threshold(cfg, task, labels["val"], res["val"])
    met = classification_metrics(labels["test"], res["test"], task, thr, names)
    val_met = classification_metrics(labels["val"], res["val"], task, thr, names)
    run = {"run_id": run_id, "method": method, "regime": budget.regime, "budget": float(budget.value),
           "seed": seed}
    row = {**run, "budget_label": budget.label, "n_labels": int(len(idx)),
           "n_patients": _n_patients(patients["train"][idx]),
           **{k: met.get(k, math.nan) for k in METRIC_KEYS},
           "val_auroc": val_met["auroc"],
           "threshold": json.dumps(thr) if isinstance(thr, list) else thr,
           **{k: v for k, v in met.items() if k.startswith("auroc/")},
           "time_s": round(elapsed, 3),  # feature extraction (once) is in config.json
           "info": json.dumps(res.get("info", {}), default=str)}
    res["threshold"] = thr
    return row, _pred_frame(run, test_ds, labels["test"], res["test"], task, names), res


def build_context(encoder: nn.Module, data_dir: str | Path, cfg: AdaptConfig, cache_dir: Path,
                  progress=None, sites: list[str] | None = None
                  ) -> tuple[AdaptContext, dict[str, PreparedDataset], float]:
    """Load the splits (optionally only cases of ``sites``), images, labels and cached frozen features.

    Returns (context, datasets by split, seconds spent on features)."""
    ds = load_splits(data_dir, cfg.splits)
    if sites is not None:
        for s, d in ds.items():
            keep = d.manifest["site"].astype(str).isin([str(x) for x in sites]) if "site" in d.manifest \
                else np.zeros(len(d.manifest), bool)
            d.manifest = d.manifest[keep].reset_index(drop=True)
            if not len(d):
                raise InputError(data_dir, f"no '{s}' cases at site(s) {', '.join(map(str, sites))}")
    labels = {s: d.labels() for s, d in ds.items()}
    task, n_out, names = _task_of(ds, labels)
    patients = {s: d.manifest["patient_id"].astype(str).to_numpy() for s, d in ds.items()}
    images = {s: _images(d) for s, d in ds.items()}
    encoder.eval()
    fp = encoder_fingerprint(encoder)
    features: dict[str, np.ndarray] = {}
    n_img = sum(len(v) for v in images.values())
    t_feat = progress.add_task("features (frozen encoder)", total=n_img) if progress else None
    t0 = time.perf_counter()
    for s in ("train", "val", "test"):
        on_batch = (lambda n: progress.advance(t_feat, n)) if progress else None
        ids = ds[s].manifest["case_id"].to_numpy()
        features[s], _ = cached_features(cache_dir, fp, s, encoder, images[s], ids,
                                         cfg.feature_batch_size, on_batch, cfg.precision)
    if progress:
        progress.update(t_feat, completed=n_img)
    ctx = AdaptContext(encoder, task, n_out, names, images, labels, patients, features, cfg,
                       modality=ds["train"].summary.get("modality"), fingerprint=fp)
    return ctx, ds, time.perf_counter() - t0


def run_adapt(encoder: nn.Module, data_dir: str | Path, out_dir: str | Path, cfg: AdaptConfig,
              source: str = "", progress=None) -> pd.DataFrame:
    """Run every method × budget × seed; write the tidy results table and predictions; return the table.

    With ``cfg.save_model`` the best method (validation AUROC) at the largest label budget, first seed, is
    saved as a classifier run in ``OUT/model``. ``progress``: an optional rich Progress.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base, ds, feat_time = build_context(encoder, data_dir, cfg, out / "features", progress)
    fp = base.fingerprint
    test_m = ds["test"].manifest
    sites = test_m["site"].astype(str).tolist() if "site" in test_m else [""] * len(test_m)
    np.savez(out / "embeddings.npz", features=base.features["test"], labels=base.labels["test"],
             site=np.asarray(sites, dtype=str),
             case_id=np.asarray(test_m["case_id"].astype(str).tolist(), dtype=str))

    runs = planned_runs(cfg)
    keep = set(model_candidates(cfg)) if cfg.save_model else set()
    t_runs = progress.add_task("adaptation runs", total=len(runs)) if progress else None
    cfg_dict = {**asdict(cfg), "budgets": [asdict(b) for b in cfg.budgets]}
    key = experiment_key(cfg_dict, fp, data_dir, {s: int(len(d)) for s, d in ds.items()})
    rows, preds, kept = [], [], {}
    for budget, seed, method in runs:
        rid = run_id(method, budget, seed)
        done = load_done(out / "partial", rid, key)
        if done is None:  # not finished by an earlier, interrupted job with the same settings
            if progress:
                progress.update(t_runs, description=f"adapt {rid}")
            row, pred, res = one_run(base, ds["test"], out, budget, seed, method, rid)
            done = (row, pred)
            save_done(out / "partial", rid, key, *done)
            if (budget, seed, method) in keep:
                kept[rid] = res
        rows.append(done[0])
        preds.append(done[1])
        if progress:
            progress.advance(t_runs)
    results = pd.DataFrame(rows)
    run = RunDir(out, "adapt")
    run.write_table("results.csv", results)
    run.write_json("results.json", results.to_dict(orient="records"))
    run.write_table("summary.csv", summarize(results))
    run.write_table("predictions.parquet", pd.concat(preds, ignore_index=True))
    run.write_config({
        "source": source, "data": str(Path(data_dir).resolve()), "task": base.task,
        "label_names": base.label_names, "n_out": base.n_out, "encoder": getattr(encoder, "config", {}),
        "encoder_fingerprint": fp, "feature_time_s": round(feat_time, 3),
        "preprocessing": store_preprocessing(data_dir),
        "adapt": cfg_dict, "experiment_key": key,
        "n": {s: int(len(d)) for s, d in ds.items()}})
    if cfg.save_model:
        from medfm.models.registry import ENCODERS
        from medfm.tasks.adapt.single import save_best

        name = (getattr(encoder, "config", None) or {}).get("name")
        if name in ENCODERS:
            save_best(base, ds, out, results, kept, data_dir)
        else:  # a custom encoder the registry cannot rebuild: results stand, the model file cannot
            warnings.warn(f"model not saved: encoder {name!r} is not in the encoder registry (see "
                          "`medfm models list`), so a saved run could not be rebuilt", stacklevel=2)
    return results


def run_id(method: str, budget: Budget, seed: int) -> str:
    return f"{method}-{budget.regime}{budget.value:g}-seed{seed}"


def model_candidates(cfg: AdaptConfig) -> list[tuple[Budget, int, str]]:
    """The runs a saved model is chosen from: the largest label budget (fractions before shots), first seed,
    methods that keep a model (kNN is a lookup over the training features, not a model)."""
    fr = [b for b in cfg.budgets if b.regime == "fraction"] or list(cfg.budgets)
    top = max(fr, key=lambda b: b.value)
    return [(top, cfg.first_seed, m) for m in cfg.methods if not getattr(ADAPTERS.get(m), "no_model", False)]


def store_preprocessing(data_dir: str | Path) -> dict[str, Any]:
    """The preprocessing the store's images went through, for inference on raw files to replay ({} when
    the store does not say: a synthetic store, or one written before it was recorded)."""
    summary = read_summary(data_dir)
    if isinstance(summary.get("preprocessing"), dict):
        return dict(summary["preprocessing"])
    if isinstance(summary.get("settings"), dict):
        from medfm.data.preprocess import preprocessing_of

        return preprocessing_of(data_dir)
    return {}


def summarize(results: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Mean and sd over seeds per (method, regime, budget): the label-efficiency table."""
    metrics = [m for m in (metrics or METRIC_KEYS) if m in results]
    g = results.groupby(["method", "regime", "budget"], sort=True)
    agg = g[metrics].agg(["mean", "std"])
    agg.columns = [f"{m}_{s}" for m, s in agg.columns]
    agg["n_labels"] = g["n_labels"].mean().round(1)
    agg["seeds"] = g["seed"].nunique()
    return agg.reset_index()
