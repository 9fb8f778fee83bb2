"""CLI: `medfm adapt` (label-efficiency experiments) and `medfm evaluate` (metrics, bootstrap CIs, report)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import typer

from medfm.errors import ConfigError, InputError, MedfmError


@contextmanager
def progress_bar():
    """A rich progress display, or None when MEDFM_PROGRESS=0 (tests, logs)."""
    if os.environ.get("MEDFM_PROGRESS", "1") == "0":
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as p:
        yield p


def load_model(path: Path):
    """An encoder from a run directory or weights file; unexpected library errors become one line."""
    import medfm

    try:
        return medfm.load_encoder(path)
    except MedfmError:
        raise
    except Exception as e:  # a checkpoint the converters do not understand
        raise InputError(path, f"cannot load an encoder ({type(e).__name__}: {str(e)[:120]})") from None


def adapt(
    model: Path = typer.Argument(..., help="Run directory (config.json + model.safetensors) or "
                                 "encoder weights."),
    data: Path = typer.Argument(..., help="Prepared dataset directory (from `medfm data prepare`)."),
    method: str = typer.Option("linear,knn,prototype", "--method", "-m",
                               help="Comma-separated: linear, knn, prototype, finetune, lpft (linear probe, "
                               "then fine-tune from that head), lora, scratch."),
    fractions: str = typer.Option("0.1,1.0", help="Label fractions of the training patients, e.g. "
                                  "0.01,0.1,1.0 (patient-level, stratified). Empty string for none."),
    shots: str = typer.Option("", help="k-shot budgets (k labelled images per class), e.g. 1,5,10."),
    seeds: int = typer.Option(3, help="Repetitions with different label subsets and inits (mean ± sd). "
                              "With all labels (fraction 1.0), linear / knn / prototype do not depend on the "
                              "seed and run once."),
    first_seed: int = typer.Option(0, help="Seeds are FIRST_SEED .. FIRST_SEED+SEEDS-1, so seeds can run in "
                                   "parallel processes (each with its own --out)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (results, predictions, cache, "
                             "report)."),
    k: int = typer.Option(20, help="Neighbours for knn."),
    epochs: float = typer.Option(60.0, help="Training budget of finetune / lora / scratch in epochs over the "
                                 "labelled images (same for all three), clamped to "
                                 "[--min-steps, --max-steps]."),
    steps: int = typer.Option(0, help="Exact number of optimisation steps for finetune / lora / scratch "
                              "instead of --epochs (0: use --epochs)."),
    min_steps: int = typer.Option(150, help="At least this many steps (tiny label sets), never stopped early "
                                  "before it."),
    max_steps: int = typer.Option(1500, help="At most this many steps."),
    patience: int = typer.Option(15, help="Early stopping: validation evaluations (one per epoch) without a "
                                 "better val AUROC; the best-val checkpoint is kept. 0: no early stopping."),
    batch_size: int = typer.Option(32, help="Batch size for finetune / lora / scratch."),
    lr_finetune: float = typer.Option(5e-4, help="Learning rate of the top encoder block (or CNN stage) for "
                                      "finetune / lpft; lower ones get --layer-decay per layer less."),
    layer_decay: float = typer.Option(0.75, help="Layer-wise lr decay for finetune / lpft (1: same lr "
                                      "everywhere)."),
    lr_head: float = typer.Option(2e-3, help="Learning rate of the linear head (finetune, lora, scratch)."),
    lr_lora: float = typer.Option(2e-3, help="Learning rate for LoRA adapters."),
    lr_scratch: float = typer.Option(1e-3, help="Learning rate for the from-scratch baseline."),
    label_smoothing: float = typer.Option(0.1, help="Label smoothing for finetune / lora / scratch."),
    augment: str = typer.Option("auto", help="Training augmentation: auto (by the data's modality: flips "
                                "for ultrasound, none for X-ray), light (crop/rotate/jitter), flip (light + "
                                "horizontal flips), none."),
    lora_r: int = typer.Option(8, help="LoRA rank (alpha = 2r)."),
    threshold: str = typer.Option("youden", help="Decision threshold for accuracy/F1/sens/spec: 'youden' "
                                  "(default: chosen on the validation split by Youden's J, applied to test; "
                                  "binary and multi-label) or a fixed number such as 0.5."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html in the out dir."),
    save_model: bool = typer.Option(True, "--save-model/--no-save-model", help="Save the best method's "
                                    "model (validation AUROC, largest label budget, first seed; kNN keeps "
                                    "none) as a classifier run in OUT/model (`medfm.load_run`)."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: leave the default)."),
    precision: str = typer.Option("32", help="32 | bf16-mixed | 16-mixed (GPU) for training, prediction "
                                  "and frozen features (features stay float32)."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the finetune / lora "
                                 "/ scratch models (eager with a warning if it fails)."),
) -> None:
    """Adapt a pretrained encoder with few labels and write a tidy results table (+ HTML report).

    MODEL is a run directory (config.json + model.safetensors) or encoder weights; DATA a prepared
    dataset (`medfm data prepare`) with train/test (and val) splits and labels.

    Every method runs at every label budget with every seed. Frozen features are computed once per
    encoder and split and cached in OUT/features for linear / knn / prototype. Each finished run is
    written to OUT/partial at once; rerunning the same command resumes, skipping runs already done.
    """
    import torch

    from medfm.tasks.adapt import AdaptConfig, parse_budgets, run_adapt, summarize

    if threads > 0:
        torch.set_num_threads(threads)
    methods = [m.strip() for m in method.split(",") if m.strip()]
    if not methods:
        raise ConfigError("--method: give at least one method")
    if not data.exists():
        raise InputError(data, "no such prepared dataset directory")
    cfg = AdaptConfig(methods=methods, budgets=parse_budgets(fractions, shots), seeds=seeds,
                      first_seed=first_seed, knn_k=k,
                      steps=steps, epochs=epochs, min_steps=min_steps, max_steps=max_steps,
                      patience=patience, batch_size=batch_size, lr_finetune=lr_finetune,
                      layer_decay=layer_decay, lr_head=lr_head, lr_lora=lr_lora, lr_scratch=lr_scratch,
                      label_smoothing=label_smoothing, augment=augment, lora_r=lora_r, threshold=threshold,
                      save_model=save_model, precision=precision, compile=compile)
    encoder = load_model(model)
    with progress_bar() as p:
        results = run_adapt(encoder, data, out, cfg, source=str(model), progress=p)
    _print_summary(summarize(results))
    if report:
        from medfm.eval.adapt_report import build_adapt_report

        typer.echo(f"Report: {build_adapt_report(out)}")
    typer.echo(f"Results: {Path(out) / 'results.csv'}")
    if save_model and (Path(out) / "model" / "config.json").is_file():
        typer.echo(f"Model: {Path(out) / 'model'} (medfm.load_run)")


def _mean_sd(r: dict, m: str) -> str:
    mu, sd = r[f"{m}_mean"], r[f"{m}_std"]
    return f"{mu:.3f}" + (f" ± {sd:.3f}" if sd == sd else "")


def _with_ci(r: dict, m: str) -> str:
    lo = r.get(f"{m}_lo")
    return f"{r[m]:.3f}" + (f" [{lo:.3f}, {r[f'{m}_hi']:.3f}]" if lo is not None and lo == lo else "")


def _print_summary(summary) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="test metrics (mean ± sd over seeds)")
    for c in ("method", "regime", "budget", "n_labels", "AUROC", "accuracy", "ECE"):
        t.add_column(c)
    for r in summary.to_dict(orient="records"):
        t.add_row(r["method"], r["regime"], f"{r['budget']:g}", f"{r['n_labels']:g}",
                  *(_mean_sd(r, m) for m in ("auroc", "accuracy", "ece")))
    Console().print(t)


def evaluate(
    path: Path = typer.Argument(..., help="A predictions table (.csv/.parquet: y + p columns, optional "
                                "patient_id) or an adapt output directory."),
    threshold: str = typer.Option("recorded", help="Threshold for accuracy/F1/sensitivity/specificity: "
                                  "'recorded' (adapt dir: each run's own, chosen on val when it ran; a "
                                  "predictions file: 0.5), a number, or 'youden' (maximises sensitivity + "
                                  "specificity on these predictions)."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples for 95 % CIs (0: none). Patients are "
                               "resampled when patient_id is present."),
    all_runs: bool = typer.Option(False, help="Adapt dir: CIs for every run, not only the largest budget."),
    seed: int = typer.Option(0, help="Bootstrap random seed."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Where to write metrics JSON (default: next to "
                                    "the input)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Adapt dir: (re)write report.html."),
) -> None:
    """Metrics (AUROC, accuracy, balanced accuracy, F1, sensitivity, specificity, ECE) with bootstrap CIs.

    PATH is a predictions table (.csv/.parquet with y and p columns, optional patient_id) or a
    `medfm adapt` output directory (metrics per run; the report is rewritten with the CIs).
    """
    from medfm.eval.evaluate import RECORDED, evaluate_adapt_dir, evaluate_table, read_predictions
    from medfm.rundir import write_json

    thr: float | str = threshold
    if threshold not in ("youden", RECORDED):
        try:
            thr = float(threshold)
        except ValueError:
            raise ConfigError(f"--threshold must be 'recorded', 'youden' or a number, got {threshold!r}"
                              ) from None
    if n_boot < 0:
        raise ConfigError("--n-boot must be >= 0")
    if not path.exists():
        raise InputError(path, "no such predictions file or adapt directory")
    if path.is_dir():
        if not (path / "predictions.parquet").is_file():
            raise InputError(path, "not an adapt directory (no predictions.parquet)")
        with progress_bar() as p:
            task = p.add_task("evaluate runs", total=None) if p else None
            table = evaluate_adapt_dir(path, thr, n_boot, all_runs, seed,
                                       on_run=(lambda: p.advance(task)) if p else None)
        dest = out or path / "metrics.csv"
        dest = dest if dest.suffix == ".csv" else dest / "metrics.csv"
        dest.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(dest, index=False)
        write_json(dest.with_suffix(".json"), table.to_dict(orient="records"))
        _print_runs(table)
        typer.echo(f"Metrics: {dest}")
        if report:
            from medfm.eval.adapt_report import build_adapt_report

            typer.echo(f"Report: {build_adapt_report(path, ci=table)}")
        return
    res = evaluate_table(read_predictions(path), 0.5 if thr == RECORDED else thr, n_boot, seed, where=path)
    dest = out or path.with_name(path.stem + ".metrics.json")
    write_json(dest, res)
    for k, v in res["metrics"].items():
        ci = res.get("ci", {}).get(k)
        extra = f"  [{ci['lo']:.3f}, {ci['hi']:.3f}]" if ci else ""
        typer.echo(f"{k:>18}: {v:.4f}{extra}" if isinstance(v, float) else f"{k:>18}: {v}")
    typer.echo(f"Metrics: {dest}")


def _print_runs(table) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="test metrics per run (95 % CI where computed)")
    # run names must stay whole (never "lin…"): fold long names onto a second line instead of cutting them
    t.add_column("run", overflow="fold", min_width=max((len(str(x)) for x in table["run_id"]), default=3))
    for c in ("AUROC", "accuracy", "sens", "spec", "ECE"):
        t.add_column(c)
    for r in table.to_dict(orient="records"):
        ms = ("auroc", "accuracy", "sensitivity", "specificity", "ece")
        t.add_row(r["run_id"], *(_with_ci(r, m) for m in ms))
    Console().print(t)


def register(app: typer.Typer) -> None:
    """Add `adapt` and `evaluate` to the main app."""
    app.command(name="adapt")(adapt)
    app.command(name="evaluate")(evaluate)
