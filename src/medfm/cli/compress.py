"""CLI: `medfm prune` and `medfm distill` — smaller, faster classifier runs (thin: parse, call, summarise)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from medfm.errors import ConfigError


def _auc(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def prune(
    run: Path = typer.Argument(..., help="Classifier run directory (`medfm adapt` OUT/model)."),
    data: Path = typer.Argument(..., help="Prepared dataset: fine-tune on train, select on val, test AUROC."),
    out: Path = typer.Option(..., "-o", "--out", help="Output classifier run directory."),
    macs: float = typer.Option(0.25, "--macs", help="Target MACs reduction (0.25 = a quarter fewer)."),
    steps: int = typer.Option(200, "--steps", help="Fine-tune steps after pruning (0: none)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-4, "--lr"),
    global_pruning: bool = typer.Option(False, "--global/--uniform", help="Global or per-layer ratio."),
) -> None:
    """Structured pruning (Torch-Pruning, L2 magnitude) to a MACs target, then a short fine-tune."""
    from medfm.compress import prune_classifier

    s = prune_classifier(run, data, out, target_macs_reduction=macs, finetune_steps=steps,
                         batch_size=batch_size, lr=lr, global_pruning=global_pruning)
    typer.echo(f"Pruned -> {out}: MACs {s['macs_before']:,} -> {s['macs_after']:,} "
               f"(-{s['macs_reduction']:.0%}), params {s['params_before']:,} -> {s['params_after']:,}, "
               f"test AUROC {_auc(s['auroc_before'])} -> {_auc(s['auroc_after'])}")


def distill(
    teacher: Path = typer.Argument(..., help="Teacher classifier run directory."),
    data: Path = typer.Argument(..., help="Prepared dataset (labelled train split; test for AUROC)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output classifier run directory (the student)."),
    student: str = typer.Option("resnet18", "--student", help="Registry encoder name of the student."),
    student_args: str = typer.Option("{}", "--student-args", help='Encoder options as JSON, e.g. '
                                     '\'{"width": 32}\'.'),
    student_init: Path | None = typer.Option(None, "--student-init", help="Start from this encoder run."),
    steps: int = typer.Option(500, "--steps"),
    temperature: float = typer.Option(2.0, "--temperature"),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of the soft (teacher) loss."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
) -> None:
    """Knowledge distillation of a classifier run into a smaller registry encoder + linear head."""
    from medfm.compress import distill as run_distill

    try:
        kw = json.loads(student_args)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--student-args is not valid JSON ({e.msg})") from None
    if not isinstance(kw, dict):
        raise ConfigError("--student-args must be a JSON object")
    s = run_distill(teacher, data, out, student=student, student_kwargs=kw, student_init=student_init,
                    steps=steps, temperature=temperature, alpha=alpha, batch_size=batch_size, lr=lr)
    typer.echo(f"Distilled -> {out}: test AUROC teacher {_auc(s['teacher_auroc'])} / student "
               f"{_auc(s['student_auroc'])}, MACs {s['teacher_macs']:,} -> {s['student_macs']:,}, "
               f"params {s['teacher_params']:,} -> {s['student_params']:,}")


def register(app: typer.Typer) -> None:
    """Add `prune` and `distill` to the main app."""
    app.command(name="prune")(prune)
    app.command(name="distill")(distill)
