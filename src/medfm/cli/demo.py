"""CLI: `medfm demo` — the whole toolkit end to end on generated data, in minutes on a laptop CPU."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    data: str | None = typer.Option(None, help="A prepared dataset directory or medmnist:NAME (e.g. "
                                    "medmnist:breastmnist) instead of generated phantom chest X-rays."),
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Output folder (re-running resumes)."),
    fast: bool = typer.Option(False, "--fast", help="Smaller preset (fewer cases, shallower encoder, "
                              "one seed)."),
    steps: int | None = typer.Option(None, help="MAE pretraining steps (overrides the preset)."),
    n_cases: int | None = typer.Option(None, "--n", help="Phantom cases to generate (overrides the preset)."),
    threads: int = typer.Option(0, help="Torch CPU threads (0: leave the default)."),
    precision: str = typer.Option("auto", help="auto (bf16-mixed where the CPU/GPU computes bf16 natively, "
                                  "else 32), 32 or bf16-mixed: pretraining and adaptation."),
) -> None:
    """Phantom data -> prepare -> MAE pretraining -> linear probe / kNN / prototypes / LoRA vs from-scratch
    at several label fractions -> a self-contained HTML report."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medfm.pipeline.demo import DemoConfig, run_demo

    if threads > 0:
        torch.set_num_threads(threads)
    kw = {"out": out, "data": data, "precision": precision}
    if steps is not None:
        kw["pretrain_steps"] = steps
    if n_cases is not None:
        kw["n_cases"] = n_cases
    cfg = DemoConfig.fast(**kw) if fast else DemoConfig(**kw)
    console = Console()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as p:
        report = run_demo(cfg, log=console.print, progress=p)
    typer.echo(f"Report: {report.resolve()}")


def register(app: typer.Typer) -> None:
    """Add `demo` to the main app."""
    app.command(name="demo")(demo)
