"""Matplotlib figures for evaluation reports. Each function returns a Figure (headless Agg backend)."""

from __future__ import annotations

import zlib

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# One colour per method, stable across figures; the scratch baseline is grey and dashed everywhere.
_METHOD_COLORS = {"linear": "#1f77b4", "knn": "#2ca02c", "prototype": "#9467bd", "finetune": "#d62728",
                  "lora": "#ff7f0e", "lpft": "#8c564b", "scratch": "#555555"}
_FALLBACK = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def method_color(method: str) -> str:
    # crc32, not hash(): str hashes change between processes, colours must not
    return _METHOD_COLORS.get(method, _FALLBACK[zlib.crc32(method.encode()) % len(_FALLBACK)])


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.3, linewidth=0.6)


def label_efficiency(results: pd.DataFrame, metric: str = "auroc", reference: dict[str, float] | None = None):
    """Metric vs number of labelled training images, one line per method (mean ± sd band over seeds).

    One panel per regime present (label fractions, k-shot). ``reference``: horizontal lines, e.g. a published
    fully-supervised baseline {"ResNet-18 (28), published": 0.901}.
    """
    regimes = [r for r in ("fraction", "shots") if r in set(results["regime"])]
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.6 * len(regimes), 4.0), squeeze=False)
    titles = {"fraction": "Label fractions", "shots": "k-shot (k per class)"}
    for ax, regime in zip(axes[0], regimes):
        sub = results[results["regime"] == regime]
        for method, g in sub.groupby("method", sort=False):
            s = g.groupby("budget").agg(x=("n_labels", "mean"), m=(metric, "mean"), sd=(metric, "std"))
            s = s.sort_values("x")
            sd = s["sd"].fillna(0).to_numpy()
            dashed = method == "scratch"
            c = method_color(method)
            ax.plot(s["x"], s["m"], ls="--" if dashed else "-", marker="o", ms=4, lw=2 if not dashed else 1.6,
                    color=c, label=f"{method} (from scratch)" if dashed else method)
            ax.fill_between(s["x"], s["m"] - sd, s["m"] + sd, color=c, alpha=0.12 if not dashed else 0.07)
        for i, (name, val) in enumerate((reference or {}).items()):
            ax.axhline(val, color="black", lw=1, ls=":", alpha=0.8)
            ax.text(ax.get_xlim()[0] if i else 0.01, val, f" {name}", va="bottom", fontsize=8,
                    transform=ax.get_yaxis_transform() if not i else ax.get_yaxis_transform())
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        xs = sorted(set(sub["n_labels"].groupby(sub["budget"]).mean().round().astype(int)))
        ax.set_xticks(xs)
        ax.set_xlabel("labelled training images")
        ax.set_ylabel(metric.upper() if metric == "auroc" else metric.replace("_", " "))
        ax.set_title(titles[regime])
        _style(ax)
    axes[0, -1].legend(fontsize=8, frameon=True, framealpha=0.85, loc="best")
    fig.tight_layout()
    return fig


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], title: str = "ROC (test)"):
    """curves: {name: (fpr, tpr, auroc)}."""
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    for name, (fpr, tpr, auc) in curves.items():
        method = name.split(" ")[0]
        ax.plot(fpr, tpr, lw=1.8, color=method_color(method), ls="--" if method == "scratch" else "-",
                label=f"{name}  AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":")
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.set_aspect("equal")
    _style(ax)
    ax.legend(fontsize=7.5, frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


def reliability_diagram(bins_by_name: dict[str, dict[str, np.ndarray]], eces: dict[str, float] | None = None,
                        title: str = "Reliability (test)"):
    """bins_by_name: {name: medfm.eval.calibration.reliability_bins(...)}."""
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":", label="perfect calibration")
    for name, b in bins_by_name.items():
        ok = b["count"] > 0
        method = name.split(" ")[0]
        ece = f"  ECE {eces[name]:.3f}" if eces and name in eces else ""
        ax.plot(b["confidence"][ok], b["observed"][ok], marker="o", ms=4, lw=1.6, color=method_color(method),
                ls="--" if method == "scratch" else "-", label=f"{name}{ece}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.set_aspect("equal")
    _style(ax)
    ax.legend(fontsize=7.5, frameon=False, loc="upper left")
    fig.tight_layout()
    return fig


def _scatter_by(ax, xy: np.ndarray, values: np.ndarray, title: str) -> None:
    vals = np.asarray([str(v) for v in values])
    cats = sorted(set(vals.tolist()))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(cats[:10]):
        m = vals == c
        ax.scatter(xy[m, 0], xy[m, 1], s=12, alpha=0.75, color=cmap(i), label=f"{c} (n={int(m.sum())})",
                   edgecolors="none")
    if len(cats) > 10:
        m = ~np.isin(vals, cats[:10])
        ax.scatter(xy[m, 0], xy[m, 1], s=10, alpha=0.5, color="#bbb", label="other", edgecolors="none")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7.5, frameon=False, markerscale=1.5)


def embedding_map(xy: np.ndarray, labels: np.ndarray, sites: np.ndarray | None, method: str = "PCA"):
    """Side-by-side scatter of a 2-D embedding coloured by label and by site."""
    has_site = sites is not None and len(set(map(str, sites))) > 1
    fig, axes = plt.subplots(1, 2 if has_site else 1, figsize=(9.5 if has_site else 4.8, 4.2), squeeze=False)
    _scatter_by(axes[0, 0], xy, labels, f"{method} of test embeddings, by label")
    if has_site:
        _scatter_by(axes[0, 1], xy, sites, f"{method} of test embeddings, by site")
    fig.tight_layout()
    return fig


def thumbnail_2d(img: np.ndarray) -> np.ndarray:
    """A 2D view of one image: (H, W), (C, H, W) -> first channel; volumes (D, H, W) or (C, D, H, W)
    -> the middle axial slice of the first channel, so 3D data can be shown wherever 2D is."""
    if img.ndim == 4:
        img = img[0]
    if img.ndim == 3:
        # a leading axis of 1 or 3 is a channel axis (2D); anything longer is depth (a volume)
        img = img[0] if img.shape[0] in (1, 3) else img[img.shape[0] // 2]
    return img


def prediction_grid(images: np.ndarray, y_true: list[str], y_pred: list[str], probs: list[float],
                    ncols: int = 8):
    """Thumbnails with true / predicted label and probability; green when right, red when wrong."""
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.45 * ncols, 1.75 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        ax = axes.ravel()[i]
        raw = np.asarray(images[i])
        img = thumbnail_2d(raw.astype(np.float32))
        # fixed grey scale for stored 8-bit images, so contrast is comparable across thumbnails
        vmin, vmax = (0, 255) if raw.dtype == np.uint8 else (None, None)
        ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax)
        ok = y_true[i] == y_pred[i]
        ax.set_title(f"true {y_true[i]}\npred {y_pred[i]} ({probs[i]:.2f})", fontsize=7,
                     color="#1a7f37" if ok else "#c62828")
    fig.tight_layout()
    return fig
