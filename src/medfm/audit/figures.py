"""The audit's figures, each a function (section data) -> matplotlib Figure; audit.html embeds them and
``figures/`` keeps them as PNG. Inputs are audit.json sections (plus score arrays for the OOD histograms),
so a figure can be redrawn from a finished audit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medfm.eval.plots import reliability_diagram, thumbnail_2d  # noqa: E402


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.3, linewidth=0.6)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def cross_site_heatmap(matrix: Mapping, metric: str = "auroc", title: str = "AUROC"):
    """Train x test grid of ``metric`` with its CI written in each cell (internal cells outlined)."""
    cells = matrix["cells"]
    rows, cols = matrix["sites"]["train"], matrix["sites"]["test"]
    grid = np.full((len(rows), len(cols)), np.nan)
    text = {}
    for c in cells:
        i, j = rows.index(c["train_site"]), cols.index(c["test_site"])
        v = c[metric]
        grid[i, j] = _num(v["value"])
        text[i, j] = (f"{_num(v['value']):.2f}\n[{_num(v['lo']):.2f}, {_num(v['hi']):.2f}]\nn={c['n']}")
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(cols), 1.2 + 0.9 * len(rows)))
    im = ax.imshow(grid, vmin=0.5, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for (i, j), t in text.items():
        ax.text(j, i, t, ha="center", va="center", fontsize=7.5)
    for c in cells:
        if c.get("internal"):
            i, j = rows.index(c["train_site"]), cols.index(c["test_site"])
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, ec="black"))
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("test data")
    ax.set_ylabel("model (trained on)")
    ax.set_title(f"{title} (95% CI); outlined = internal", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def _bins(b: Mapping) -> dict[str, np.ndarray]:
    return {k: np.array([_num(v) for v in vals]) for k, vals in b.items()}


def reliability_before_after(cal: Mapping):
    """Reliability diagram of the pooled evaluation cases before and after temperature scaling."""
    after = f"after (T={cal['temperature']:.2f})"
    bins = {"before": _bins(cal["before"]["bins"]), after: _bins(cal["after"]["bins"])}
    eces = {"before": _num(cal["before"]["ece"]), after: _num(cal["after"]["ece"])}
    return reliability_diagram(bins, eces, title="Reliability: before / after temperature scaling")


def ood_histograms(val: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray],
                   thresholds: Mapping[str, float], label: str):
    """Per score: in-distribution validation vs target score histograms, with the threshold."""
    names = [n for n in target if n in val]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 2.8), squeeze=False)
    for ax, n in zip(axes[0], names):
        a, b = np.asarray(val[n], float), np.asarray(target[n], float)
        edges = np.histogram_bin_edges(np.r_[a, b], bins=30)
        ax.hist(a, edges, alpha=0.6, density=True, color="#1f77b4", label="reference val")
        ax.hist(b, edges, alpha=0.6, density=True, color="#d62728", label=label)
        if n in thresholds:
            ax.axvline(thresholds[n], color="black", ls="--", lw=1, label="threshold (95% of val)")
        ax.set_title(n, fontsize=10)
        ax.set_xlabel("score (higher = more atypical)", fontsize=8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
        ax.tick_params(labelsize=7)
        _style(ax)
    axes[0, 0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def atypical_thumbnails(images: Sequence[np.ndarray], titles: Sequence[str]):
    """A row of thumbnails of the most atypical cases (titles: hashed case id and score)."""
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.2), squeeze=False)
    for ax, img, t in zip(axes[0], images, titles):
        ax.imshow(thumbnail_2d(np.asarray(img, dtype=np.float32)), cmap="gray")
        ax.set_title(t, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def fairness_bars(res: Mapping, attr: str, metrics: Sequence[str] = ("auroc", "fnr", "fpr")):
    """Per-group bars with CIs for each metric; groups under the minimum size are grey and hatched."""
    groups = res["groups"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics), 2.9), squeeze=False)
    x = np.arange(len(groups))
    for ax, m in zip(axes[0], metrics):
        v = np.array([_num(g[m]["value"]) for g in groups])
        lo = np.array([_num(g[m]["lo"]) for g in groups])
        hi = np.array([_num(g[m]["hi"]) for g in groups])
        err = np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0).clip(0)
        colors = ["#bbbbbb" if g["too_small"] else "#1f77b4" for g in groups]
        bars = ax.bar(x, np.nan_to_num(v), yerr=err, color=colors, capsize=3)
        for b, g in zip(bars, groups):
            if g["too_small"]:
                b.set_hatch("//")
        ax.set_xticks(x, [f"{g['group']}\n(n={g['n']})" for g in groups], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title({"fnr": "FNR (missed positives)", "fpr": "FPR (false alarms)"}.get(m, m.upper()),
                     fontsize=9)
        _style(ax)
    fig.suptitle(f"{attr} (grey hatched: fewer than {res['min_size']} cases, not ranked)", fontsize=9)
    fig.tight_layout()
    return fig


def randomisation_curves(methods: Mapping[str, Mapping]):
    """Rank correlation of each method's maps with the trained model's as layers are randomised top-down;
    a method passes when the curve falls below its threshold."""
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    thr = None
    for name, m in methods.items():
        steps = m["randomisation"]["steps"]
        ys = [_num(s["spearman"]) for s in steps]
        ax.plot(range(len(ys)), ys, marker="o", ms=3,
                label=f"{name} ({'passes' if m['passed_randomisation'] else 'FAILS'})")
        thr = m["randomisation"]["threshold"]
        labels = [s["layer"] for s in steps]
    if thr is not None:
        ax.axhline(thr, color="black", ls="--", lw=0.8, label="pass threshold")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("Spearman vs trained maps")
    ax.set_xlabel("randomised down to")
    ax.set_title("Cascading parameter randomisation", fontsize=10)
    _style(ax)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
