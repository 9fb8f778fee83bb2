"""A small, generic, self-contained HTML report builder.

Figures are inlined as base64 PNG and styles are inline, so a report is one file that opens anywhere with
no network (no CDN, no JavaScript). Reusable by any task::

    r = Report("Segmentation", subtitle="run 42")
    r.add_heading("Dice per case")
    r.add_table(df)
    r.add_figure(fig, caption="Dice distribution")
    r.save("report.html")
"""

from __future__ import annotations

import base64
import html
import io
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:28px 36px 60px}
header{background:#1f3b5c;color:#fff;padding:26px 36px}
header h1{margin:0;font-size:26px;font-weight:600}
header p{margin:6px 0 0;opacity:.85;font-size:14px}
h2{font-size:20px;margin:34px 0 10px;padding-bottom:6px;border-bottom:2px solid #d8dde6}
h3{font-size:16px;margin:22px 0 8px}
p.text{line-height:1.5;font-size:14.5px;max-width:900px}
figure{margin:12px 0;background:#fff;border:1px solid #dde2ea;border-radius:6px;padding:10px;
  display:inline-block;vertical-align:top;max-width:100%;box-sizing:border-box}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:12.5px;color:#4a5568;margin-top:6px}
.row{display:flex;flex-wrap:wrap;gap:14px}
.row figure{flex:1 1 340px}
table{border-collapse:collapse;font-size:13px;background:#fff;margin:10px 0;border:1px solid #dde2ea}
th{background:#eef1f6;text-align:left;padding:6px 10px;border-bottom:1px solid #cfd6e0;font-weight:600}
td{padding:5px 10px;border-bottom:1px solid #edf0f4;font-variant-numeric:tabular-nums}
tr:hover td{background:#f8fafc}
.caption{font-size:12.5px;color:#4a5568;margin:2px 0 4px}
.kv{display:grid;grid-template-columns:max-content auto;gap:4px 18px;font-size:13.5px;background:#fff;
  border:1px solid #dde2ea;border-radius:6px;padding:12px 16px;max-width:900px}
.kv b{color:#4a5568;font-weight:600}
.note{background:#fff8e6;border-left:4px solid #e0a800;padding:8px 12px;font-size:13.5px;max-width:900px}
footer{font-size:12px;color:#6b7280;margin-top:40px}
"""


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float | np.floating):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return html.escape(str(v))


def figure_to_png(fig, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it (figures otherwise pile up in memory)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


class Report:
    """Append-only list of HTML blocks; ``save`` writes one self-contained file."""

    def __init__(self, title: str, subtitle: str | None = None) -> None:
        self.title = title
        self.subtitle = subtitle
        self.blocks: list[str] = []
        self._row: list[str] | None = None

    def _add(self, block: str) -> Report:
        (self._row if self._row is not None else self.blocks).append(block)
        return self

    def add_heading(self, text: str, level: int = 2) -> Report:
        level = min(max(level, 2), 4)
        return self._add(f"<h{level}>{html.escape(text)}</h{level}>")

    def add_text(self, text: str) -> Report:
        """Plain text (escaped); blank lines separate paragraphs."""
        for para in str(text).split("\n\n"):
            if para.strip():
                self._add(f'<p class="text">{html.escape(para.strip())}</p>')
        return self

    def add_note(self, text: str) -> Report:
        return self._add(f'<div class="note">{html.escape(text)}</div>')

    def add_html(self, raw: str) -> Report:
        """Trusted HTML, inserted as is."""
        return self._add(raw)

    def add_kv(self, items: dict[str, Any]) -> Report:
        """A compact key/value panel (run facts, dataset sizes...)."""
        cells = "".join(f"<b>{html.escape(str(k))}</b><span>{_fmt(v, 4)}</span>" for k, v in items.items())
        return self._add(f'<div class="kv">{cells}</div>')

    def add_table(self, df: pd.DataFrame, caption: str | None = None, digits: int = 3,
                  max_rows: int = 200) -> Report:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
        body = "".join("<tr>" + "".join(f"<td>{_fmt(v, digits)}</td>" for v in row) + "</tr>"
                       for row in df.head(max_rows).itertuples(index=False))
        more = f'<div class="caption">… {len(df) - max_rows} more rows</div>' if len(df) > max_rows else ""
        cap = f'<div class="caption">{html.escape(caption)}</div>' if caption else ""
        return self._add(f"{cap}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}")

    def add_image(self, png: bytes, caption: str | None = None, width: int | None = None) -> Report:
        b64 = base64.b64encode(png).decode("ascii")
        style = f' style="width:{int(width)}px"' if width else ""
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        return self._add(f'<figure><img{style} alt="{html.escape(caption or "figure")}" '
                         f'src="data:image/png;base64,{b64}">{cap}</figure>')

    def add_figure(self, fig, caption: str | None = None, width: int | None = None, dpi: int = 110) -> Report:
        """A matplotlib figure, inlined as PNG (the figure is closed)."""
        return self.add_image(figure_to_png(fig, dpi), caption, width)

    def begin_row(self) -> Report:
        """Following figures go side by side until ``end_row``."""
        self._row = []
        return self

    def end_row(self) -> Report:
        row, self._row = self._row or [], None
        return self._add('<div class="row">' + "".join(row) + "</div>")

    def to_html(self) -> str:
        if self._row is not None:
            self.end_row()
        sub = f"<p>{html.escape(self.subtitle)}</p>" if self.subtitle else ""
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M")
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width,initial-scale=1">'
                f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
                f"<header><h1>{html.escape(self.title)}</h1>{sub}</header><main>"
                + "\n".join(self.blocks)
                + f"<footer>Generated by medfm on {stamp}. Self-contained file: no network needed.</footer>"
                "</main></body></html>")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_html(), encoding="utf-8")
        tmp.replace(path)
        return path
