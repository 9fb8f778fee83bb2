"""`medfm demo` end to end at a tiny size: phantom -> prepare -> MAE -> adaptation -> report."""

from __future__ import annotations

import json

import pandas as pd
import pytest


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path):
    from medfm.pipeline.demo import DemoConfig, run_demo

    logs: list[str] = []
    out = tmp_path / "demo"
    report = run_demo(DemoConfig.tiny(out=out), log=logs.append)
    assert report == out / "report.html" and report.is_file()
    html = report.read_text()
    assert "Label efficiency" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html  # self-contained: opens with no network
    assert (out / "pretrain" / "model.safetensors").is_file()
    res = pd.read_csv(out / "adapt" / "results.csv")
    assert set(res["method"]) == {"linear", "prototype", "lora", "scratch"}
    assert res["auroc"].notna().all()
    assert len(logs) == 4 and all(line.startswith("✓") for line in logs)
    timings = json.loads((out / "demo_timings.json").read_text())
    assert timings["total"] > 0


def test_demo_cli_rejects_bad_data(tmp_path):
    from typer.testing import CliRunner

    from medfm.cli.app import app

    r = CliRunner().invoke(app, ["demo", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0
    assert "not a prepared dataset" in str(r.exception)
