"""Issue 16 must-shows, end to end through the CLI:

- identifiers planted in DICOM tags *and* in folder and file names reach nothing that `prepare`, `overview`,
  `pretrain` (run dir incl. model card) and `adapt` (results + report) write, nor their terminal output;
- the phantom's 3D CT set, prepared from its NIfTI manifest, goes through `adapt` (with report) and
  `evaluate`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfm.cli.app import app

sys.path.insert(0, str(Path(__file__).parent))
from badinputs import FAKE_IDENTIFIERS, make_dicom  # noqa: E402

pytestmark = pytest.mark.slow

# Long enough that random bytes in weights or image shards cannot match by chance.
PATH_WORDS = ("Janetta", "Doe_Jan", "MRN12345")
TAG_WORDS = tuple(v for v in FAKE_IDENTIFIERS.values() if len(v) >= 8)


def _invoke(args: list[str]) -> str:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (args, res.output)
    return res.output


def _archive(root: Path, n: int = 36) -> Path:
    """DICOM radiographs under patient-named folders; label = a bright square; a manifest gives labels."""
    rng = np.random.default_rng(0)
    rows = ["image,label"]
    for i in range(n):
        patient = f"Doe_Janetta_MRN12345_{i % 6}"
        img = rng.integers(100, 900, (32, 32)).astype(np.uint16)
        label = i % 2
        if label:
            img[8:16, 8:16] = 4000
        ids = dict(FAKE_IDENTIFIERS, PatientID=f"{FAKE_IDENTIFIERS['PatientID']}{i % 6}")
        rel = f"{patient}/Doe_Janetta_{i:03d}.dcm"
        (root / patient).mkdir(parents=True, exist_ok=True)
        make_dicom(root / rel, img, modality="DX", identifiers=ids)
        rows.append(f"{rel},{label}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def _hits(paths: list[Path], words: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for top in paths:
        for p in [top] if top.is_file() else [q for q in top.rglob("*") if q.is_file()]:
            data = p.read_bytes() + str(p.relative_to(top.parent)).encode()
            found = [w for w in words if w.encode() in data]
            if found:
                out[str(p)] = found
    return out


def test_no_planted_identifier_reaches_any_output(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDFM_PROGRESS", "0")
    manifest = _archive(tmp_path / "archive")
    data, run, adapt = tmp_path / "prepared", tmp_path / "run", tmp_path / "adapt"
    logs = [
        _invoke(["data", "prepare", str(manifest), "--out", str(data), "--size", "32", "--labels", "label",
                 "--salt-file", str(tmp_path / "secret" / "salt"), "--workers", "0"]),
        _invoke(["data", "overview", str(data), "-o", str(tmp_path / "overview.html")]),
        _invoke(["pretrain", "mae", str(data), "--out", str(run), "--img-size", "32", "--patch-size", "8",
                 "--steps", "3", "--batch-size", "8", "--workers", "0", "--log-every", "1",
                 "--encoder-args", '{"depth": 1, "embed_dim": 32, "num_heads": 2}']),
        _invoke(["adapt", str(run), str(data), "-m", "linear,knn", "--fractions", "1.0", "--seeds", "1",
                 "--k", "3", "--out", str(adapt)]),
        _invoke(["evaluate", str(adapt), "--n-boot", "10"]),
    ]
    assert json.loads((data / "summary.json").read_text())["n_cases"] == 36
    assert (run / "README.md").exists() and (adapt / "report.html").exists()
    (tmp_path / "terminal.log").write_text("\n".join(logs))
    outputs = [data, tmp_path / "overview.html", run, adapt, tmp_path / "terminal.log"]
    assert _hits(outputs, PATH_WORDS + TAG_WORDS) == {}
    # The private map back to the source files exists, outside every output, beside the salt.
    maps = list((tmp_path / "secret").glob("case_map_*.json"))
    assert len(maps) == 1 and "Janetta" in maps[0].read_text()


def test_phantom_ct3d_through_prepare_adapt_report_and_evaluate(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDFM_PROGRESS", "0")
    from medfm.models.io import save_encoder
    from medfm.models.registry import create_encoder

    src, data, out = tmp_path / "ct", tmp_path / "prepared", tmp_path / "adapt"
    _invoke(["data", "phantom", "--kind", "ct3d", "--n", "40", "--size", "24", "--out", str(src)])
    _invoke(["data", "prepare", str(src / "manifest.csv"), "--out", str(data), "--volume-shape", "16,16,16",
             "--labels", "consolidation", "--workers", "0", "--salt-file", str(tmp_path / "salt")])
    summary = json.loads((data / "summary.json").read_text())
    assert summary["n_cases"] == 40 and summary["image_shape"] == [1, 16, 16, 16]
    save_encoder(create_encoder("vit_tiny", spatial_dims=3, img_size=16, patch_size=8, depth=1, embed_dim=16,
                                num_heads=2), tmp_path / "enc")
    _invoke(["adapt", str(tmp_path / "enc"), str(data), "-m", "linear,knn", "--fractions", "1.0",
             "--seeds", "1", "--k", "3", "--out", str(out)])
    res = pd.read_csv(out / "results.csv")
    assert set(res["method"]) == {"linear", "knn"} and res["auroc"].between(0, 1).all()
    html = (out / "report.html").read_text()
    assert "Example predictions" in html and "<img" in html
    r = CliRunner().invoke(app, ["evaluate", str(out), "--n-boot", "10"])
    assert r.exit_code == 0, r.output
    assert len(pd.read_csv(out / "metrics.csv")) == 2
