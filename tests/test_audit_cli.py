"""`medfm audit`: thin CLI over run_audit — parses, runs (with a progress bar), prints the findings and the
output paths; bad inputs are one-line errors; --help explains every section."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from medfm.cli.app import app
from medfm.errors import MedfmError
from test_audit_run import SECRET, make_store  # tests/ is on sys.path (pytest rootdir import mode)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from medfm.models.registry import create_encoder
    from medfm.tasks.adapt import fit_classifier

    root = tmp_path_factory.mktemp("audit_cli")
    ref = make_store(root / "ref", 0, ("a", "b"), masks=False, n=40)
    tgt = make_store(root / "tgt", 1, ("c",), masks=False, n=40)
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", img_size=16, patch_size=4, depth=1, embed_dim=16, num_heads=2)
    fit_classifier(enc, ref, root / "model", method="linear")
    return root, ref, tgt


def test_cli_runs_the_audit_and_prints_findings_and_paths(world):
    root, ref, tgt = world
    out = root / "out"
    r = CliRunner().invoke(app, ["audit", str(root / "model"), str(ref), str(tgt), "--out", str(out),
                                 "--attributes", "sex,site", "--explain", "ig", "--n-explain", "2",
                                 "--n-boot", "20", "--n-perm", "20", "--min-group", "5", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "ref: reference" in r.output and "tgt: target" in r.output
    assert f"Report: {out / 'audit.html'}" in r.output and f"Audit: {out / 'audit.json'}" in r.output
    doc = json.loads((out / "audit.json").read_text())
    assert doc["settings"]["attributes"] == ["sex", "site"] and doc["settings"]["n_boot"] == 20
    assert list(doc["explanations"]["methods"]) == ["integrated_gradients"]  # "ig" resolved
    assert set(doc["fairness"]) == {"sex", "site", "dataset"}
    for f in doc["findings"]:
        assert f in r.output
    assert SECRET not in r.output and SECRET not in (out / "audit.html").read_text()


@pytest.mark.parametrize("bad", ["missing_data", "missing_model", "method", "n_boot"])
def test_cli_bad_inputs_are_one_line_errors(world, bad, tmp_path):
    root, ref, _ = world
    model, data, extra = str(root / "model"), str(ref), []
    if bad == "missing_data":
        data = str(tmp_path / "nope")
    elif bad == "missing_model":
        model = str(tmp_path / "no_model")
    elif bad == "method":
        extra = ["--explain", "magic"]
    else:
        extra = ["--n-boot", "0"]
    r = CliRunner().invoke(app, ["audit", model, data, "--out", str(tmp_path / "o"), *extra],
                           env={"MEDFM_PROGRESS": "0"})
    assert r.exit_code != 0
    assert isinstance(r.exception, MedfmError) and "\n" not in str(r.exception)
    assert {"missing_data": "nope", "missing_model": "no_model", "method": "magic",
            "n_boot": "n_boot"}[bad] in str(r.exception)


def test_help_explains_every_section():
    r = CliRunner().invoke(app, ["audit", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for word in ("cross-site", "shift", "ood", "fairness", "calibration", "explanations", "shortcuts",
                 "mitigation", "monitor", "--per-site", "--tent"):
        assert word in r.output


def test_cli_defaults_match_the_library():
    import inspect

    from medfm.audit.run import AuditConfig
    from medfm.cli.audit import audit

    lib = AuditConfig()
    cli = {k: p.default.default for k, p in inspect.signature(audit).parameters.items()
           if hasattr(p.default, "default")}
    assert cli["attributes"] == ",".join(lib.attributes) and cli["explain"] == "" and lib.explain is None
    assert cli["label"] == "" and lib.label is None and cli["prompts"] == "" and lib.prompts is None
    for k in ("n_explain", "n_boot", "n_perm", "min_group", "per_site", "tent", "seed"):
        assert cli[k] == getattr(lib, k), k
