"""Look at a prepared dataset: rich summary tables and a self-contained HTML overview page.

The HTML embeds every image as a base64 PNG (no network, one file to mail to a clinician): counts per
split/site/label, intensity histograms per site (site shift is often visible here first), and a montage of
sample images per site with masks overlaid in red.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from medfm.data.store import PreparedDataset, read_manifest, read_summary


def summary_tables(root: str | Path) -> list[Any]:
    """Rich tables for `medfm data info`: overview, counts per split x site, labels, skipped files."""
    from rich.table import Table

    s = read_summary(root)
    head = Table(title=f"prepared dataset {root}", show_header=False)
    for k in (
        "n_cases",
        "n_skipped",
        "spatial_dims",
        "image_shape",
        "image_dtype",
        "n_shards",
        "has_masks",
        "task",
        "label_columns",
        "modality",
        "identifiers",
    ):
        head.add_row(k, str(s.get(k)))
    tables = [head]
    counts = s.get("counts", {})
    if counts.get("split_site"):
        t = Table(title="cases per split / site")
        t.add_column("split/site")
        t.add_column("cases", justify="right")
        for k, v in counts["split_site"].items():
            t.add_row(k or "-", str(v))
        tables.append(t)
    for col, vals in counts.get("label", {}).items():
        t = Table(title=f"label {col}")
        t.add_column("value")
        t.add_column("cases", justify="right")
        names = s.get("label_classes", {}).get(col, [])
        for k, v in vals.items():
            i = int(k)
            t.add_row(f"{k} ({names[i]})" if 0 <= i < len(names) and str(names[i]) != k else k, str(v))
        tables.append(t)
    if s.get("skipped"):
        t = Table(title=f"skipped ({len(s['skipped'])})")
        t.add_column("case")
        t.add_column("error")
        for row in s["skipped"][:50]:
            t.add_row(row["case_id"], row["error"])
        tables.append(t)
    return tables


def _png_b64(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fig_b64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _view(item: dict[str, Any]) -> np.ndarray:
    """An item -> (H, W, 3) uint8 picture; volumes show their middle slice; masks overlaid in red."""
    img = item["image"].numpy()
    img = img[:, img.shape[1] // 2] if img.ndim == 4 else img
    grey = img.mean(axis=0) if img.shape[0] != 3 else None
    rgb = np.stack([grey] * 3, -1) if grey is not None else np.moveaxis(img, 0, -1)
    rgb = np.clip(rgb.astype(np.float32), 0, 1)
    if "mask" in item:
        m = item["mask"].numpy()
        m = m[m.shape[0] // 2] if m.ndim == 3 else m
        on = m > 0
        rgb[on] = 0.6 * rgb[on] + 0.4 * np.array([1.0, 0.0, 0.0])
    return (rgb * 255).astype(np.uint8)


def montage(pictures: list[np.ndarray], cols: int = 8) -> np.ndarray:
    """Tile equally sized (H, W, 3) pictures into one grid (2 px gaps)."""
    h, w = pictures[0].shape[:2]
    rows = (len(pictures) + cols - 1) // cols
    cols = min(cols, len(pictures))
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, dtype=np.uint8)
    for i, p in enumerate(pictures):
        r, c = divmod(i, cols)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = p
    return grid


def _table_html(title: str, counts: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>" for k, v in counts.items())
    return f"<h3>{html.escape(title)}</h3><table><tr><th>value</th><th>cases</th></tr>{rows}</table>"


def build_overview_html(root: str | Path, per_site: int = 8, hist_cases: int = 200, seed: int = 0) -> str:
    """The overview page as one HTML string (images inline as base64 PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    s = read_summary(root)
    ds = PreparedDataset(root)
    man = read_manifest(root)
    sites = man["site"].fillna("").astype(str).replace("", "(none)")
    rng = np.random.default_rng(seed)
    counts = s.get("counts", {})
    parts = [
        f"<h1>Prepared dataset: {html.escape(root.name)}</h1>",
        f"<p>{s.get('n_cases')} cases, {s.get('n_skipped')} skipped; image shape {s.get('image_shape')} "
        f"{s.get('image_dtype')}; task {html.escape(str(s.get('task')))}; "
        f"modality {html.escape(str(s.get('modality')))}</p>",
    ]
    for key in ("split", "site", "split_site"):
        if counts.get(key):
            parts.append(_table_html(f"cases per {key.replace('_', ' / ')}", counts[key]))
    for col, vals in counts.get("label", {}).items():
        parts.append(_table_html(f"label {col}", vals))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    montages = []
    for site in sorted(sites.unique()):
        idx = np.flatnonzero(sites.to_numpy() == site)
        pick = rng.choice(idx, size=min(hist_cases, len(idx)), replace=False)
        values = np.concatenate([ds[int(i)]["image"].numpy().ravel()[::7] for i in pick])
        ax.hist(values, bins=50, range=(0, 1), histtype="step", density=True, label=f"{site} (n={len(idx)})")
        shown = [_view(ds[int(i)]) for i in sorted(pick[:per_site])]
        montages.append(
            f"<h3>{html.escape(site)}</h3><img alt='samples {html.escape(site)}' "
            f"src='data:image/png;base64,{_png_b64(montage(shown))}'>"
        )
    ax.set_xlabel("stored intensity (0-1)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    parts.append(
        f"<h2>Intensity histograms per site</h2><img alt='histograms' "
        f"src='data:image/png;base64,{_fig_b64(fig)}'>"
    )
    plt.close(fig)
    parts.append("<h2>Samples per site</h2>" + "".join(montages))
    if s.get("skipped"):
        rows = "".join(
            f"<tr><td>{html.escape(r['case_id'])}</td><td>{html.escape(r['error'])}</td></tr>"
            for r in s["skipped"][:200]
        )
        parts.append(f"<h2>Skipped files</h2><table><tr><th>case</th><th>error</th></tr>{rows}</table>")
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1100px} table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left} img{max-width:100%}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>medfm overview {html.escape(root.name)}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def write_overview(root: str | Path, out: str | Path, per_site: int = 8) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_overview_html(root, per_site=per_site), encoding="utf-8")
    return out
