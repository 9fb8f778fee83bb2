"""`medfm demo` end to end at a tiny size: phantom -> prepare -> MAE -> adaptation -> report."""

from __future__ import annotations

import json

import pandas as pd
import pytest


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path, monkeypatch):
    import medfm.pipeline.demo as demo
    from medfm.pipeline.demo import DemoConfig, run_demo

    assert not hasattr(demo, "run_cli")  # the demo calls the library, never the CLI in-process

    def no_cli(*args, **kwargs):
        raise AssertionError("the demo ran a `medfm` command in-process, not the library")

    monkeypatch.setattr("typer.main.get_command", no_cli)
    logs: list[str] = []
    out = tmp_path / "demo"
    report = run_demo(DemoConfig.tiny(out=out), log=logs.append)
    assert report == out / "report.html" and report.is_file()
    html = report.read_text()
    assert "Label efficiency" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html  # self-contained: opens with no network
    assert (out / "pretrain" / "model.safetensors").is_file()
    import medfm
    from medfm.rundir import open_run

    run = open_run(out / "pretrain")
    assert run.kind == "encoder" and run.config()["preprocessing"]["size"] == 32
    assert medfm.load_run(run.path).embed_dim == 32
    card = (run.path / "README.md").read_text()
    assert "medfm.load_run" in card and "unknown (no patient ids" not in card  # phantom cases have patients
    res = pd.read_csv(out / "adapt" / "results.csv")
    assert set(res["method"]) == {"linear", "prototype", "lora", "scratch"}
    assert res["auroc"].notna().all()
    assert len(logs) == 6 and all(line.startswith("✓") for line in logs[:5])
    # the demo ends with the command that serves its model; that command's model and OOD reference serve
    assert logs[5].startswith("Serve this model and open the viewer: medfm serve ")
    import shlex

    from fastapi.testclient import TestClient

    from medfm.serve.run import build

    args = shlex.split(logs[5].split(": ", 1)[1].split("  (")[0])
    app, token = build([args[2]], ood_reference=args[args.index("--ood-reference") + 1])
    health = TestClient(app).get("/health", headers={"Authorization": f"Bearer {token}"}).json()
    assert health["models"][0]["kind"] == "classifier" and "ood" in health["models"][0]["capabilities"]
    audit = json.loads((out / "audit" / "audit.json").read_text())  # the saved model, audited
    assert audit["settings"]["label"] == "effusion"  # the phantom's model is multi-label: one label audited
    assert {"shift", "fairness", "explanations"} <= set(audit) and (out / "audit" / "audit.html").is_file()
    assert "audit/audit.html" in html
    timings = json.loads((out / "demo_timings.json").read_text())
    assert timings["total"] > 0


def test_demo_cli_rejects_bad_data(tmp_path):
    from typer.testing import CliRunner

    from medfm.cli.app import app

    r = CliRunner().invoke(app, ["demo", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0
    assert "not a prepared dataset" in str(r.exception)
