"""The model card's common parts: header (kind, created, version, training data, preprocessing), the
per-kind section lookup, and "how to load"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfm.registry import Registry

Section = Callable[[dict[str, Any], dict[str, Any]], str]
# One section module per kind (or family of kinds), imported on the first lookup.
SECTIONS: Registry[str] = Registry("model card section", providers=tuple(
    f"medfm.modelcard.{m}" for m in ("encoder", "classifier", "clip", "segment")))

NO_PATIENT_IDS = "unknown (no patient ids; sampling is per image)"

TITLES = {
    "encoder": "pretrained encoder", "clip": "vision-language (CLIP-style) model",
    "classifier": "adapted classifier", "adapt": "adaptation experiment", "segmenter": "segmentation model",
    "promptable": "promptable segmentation model", "incontext": "in-context segmentation model",
}


def fmt(v: Any) -> str:
    """A value for a card: floats to 4 significant digits, None as a dash."""
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def patients_text(n: Any) -> str:
    """Patient count for a card; no ids at all is 'unknown', never a count of 1 (issue 16)."""
    if n is _NOT_RECORDED:
        return "–"
    return NO_PATIENT_IDS if n in (None, 0, "", "?") else str(n)


_NOT_RECORDED = object()


def data_parts(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The training data as a list of {name, split, images, patients, sites}, from what the run recorded.

    Writers record ``config["data"]`` as a list of such dicts (one per prepared dataset); a plain path or a
    dict is accepted too, and segmentation runs' ``n_train``.
    """
    data = config.get("data")
    if isinstance(data, dict):
        data = [data]
    elif isinstance(data, str):
        data = [{"path": data}]
    parts = [d for d in data or [] if isinstance(d, dict)]
    if not parts and config.get("n_train") is not None:
        parts = [{"images": config["n_train"], "split": "train"}]
    out = []
    for d in parts:
        # Only the dataset's folder name: full paths may carry identifiers of the user's archive.
        name = d.get("name") or (Path(str(d["path"])).name if d.get("path") else "–")
        out.append({"name": name, "split": d.get("split") or "all", "images": d.get("images", d.get("n")),
                    "patients": d.get("patients", _NOT_RECORDED), "sites": d.get("sites")})
    return out


def preprocessing_lines(config: dict[str, Any]) -> str:
    """The preprocessing inference must replay (config["preprocessing"], from the training store)."""
    spec = config.get("preprocessing")
    if not isinstance(spec, dict) or not spec:
        return "not recorded (run written before preprocessing was recorded; inference uses the defaults)"
    return ", ".join(f"{k}={fmt(v)}" for k, v in spec.items())


def header(kind: str, config: dict[str, Any], run_dir: Path) -> str:
    """Title, provenance and training data: the same for every kind."""
    env = config.get("environment") or {}
    from medfm import __version__

    lines = [
        f"# medfm {TITLES.get(kind, kind)}: {run_dir.name}",
        "",
        f"- kind: `{kind}` (run format {config.get('format_version', 1)})",
        f"- created: {env.get('time', 'unknown')}",
        f"- medfm version: {env.get('medfm', __version__)}; torch {env.get('torch', '?')}",
        "",
        "## Training data",
    ]
    parts = data_parts(config)
    from medfm.models.formats.runs import imported_lines

    imported = imported_lines(config)
    if imported:
        lines.append(imported)
    elif parts:
        lines += ["| dataset | split | cases | patients | sites |", "|---|---|---|---|---|"]
        for d in parts:
            sites = ", ".join(map(str, d["sites"])) if d.get("sites") else "–"
            lines.append(f"| `{d['name']}` | {d['split']} | {fmt(d['images'])} | "
                         f"{patients_text(d['patients'])} | {sites} |")
    else:
        lines.append("not recorded")
    lines += ["", f"Preprocessing: {preprocessing_lines(config)}", ""]
    return "\n".join(lines)


def how_to_load(kind: str, run_dir: Path) -> str:
    """The one way to load any run."""
    return f"""## How to load
```python
import medfm
model = medfm.load_run("{run_dir.name}")   # kind `{kind}`: {TITLES.get(kind, kind)}
```
Raw images at inference go through the preprocessing above:
`medfm.data.preprocess.load_input(path, medfm.rundir.open_run(run).config()["preprocessing"])`.
"""


LIMITATIONS = """## Limitations
Trained on the data listed above only; features reflect its scanners, sites and populations. Evaluate on
your own data (`medfm adapt`, `medfm evaluate`) before any use; not a medical device.
"""


def _fallback(config: dict[str, Any], metrics: dict[str, Any]) -> str:
    keys = [k for k, v in metrics.items() if isinstance(v, int | float | str) and not isinstance(v, bool)]
    rows = "\n".join(f"| {k} | {fmt(metrics[k])} |" for k in keys[:20])
    return f"## Results\n| metric | value |\n|---|---|\n{rows}\n" if rows else ""


def render_card(run: Any) -> str:
    """The README.md text of a run (a RunDir or a path)."""
    from medfm.rundir import RunDir, open_run

    run = run if isinstance(run, RunDir) else open_run(run)
    config, metrics, kind = run.config(), run.metrics(), run.kind
    section = SECTIONS.get(kind) if kind in SECTIONS else _fallback
    figs = [p.name for p in sorted(run.path.glob("*.png"))]
    fig_lines = "\n".join(f"![{p}]({p})" for p in figs)
    parts = [header(kind, config, run.path), section(config, metrics), fig_lines,
             how_to_load(kind, run.path), LIMITATIONS]
    return "\n".join(p.rstrip() + "\n" for p in parts if p and p.strip())


def write_card(run: Any) -> Path:
    """Write README.md into the run directory (atomically); returns its path."""
    from medfm.rundir import RunDir, open_run

    run = run if isinstance(run, RunDir) else open_run(run)
    return run.write_text("README.md", render_card(run))
