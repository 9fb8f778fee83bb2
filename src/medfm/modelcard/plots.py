"""Plots that go into run directories beside the card: the training loss curve."""

from __future__ import annotations

from pathlib import Path

from medfm.train.callbacks import read_history


def plot_loss_curve(history_csv: str | Path, out: str | Path, title: str = "") -> Path | None:
    """loss_curve.png from logs/train.csv (None if there are no rows yet); written atomically."""
    rows = read_history(history_csv)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medfm.rundir import RunDir

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    return RunDir(out.parent).save_figure(fig, out.name)
