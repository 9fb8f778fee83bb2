"""Issue 16 items 1-3: relative/odd input paths, a 0-case job fails, no path-borne identifiers written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfm.data.prepare import PrepareConfig, prepare

CLI = [sys.executable, "-c", "from medfm.cli.app import main; main()"]


def _pngs(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(folder / n)


def _run(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(home), MEDFM_HOME=str(home / ".medfm"), MEDFM_PROGRESS="0")
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("arg", ["good/", "my scans é/"])
def test_readme_form_from_a_relative_folder(tmp_path, arg):
    """The README's own command in a real shell-like subprocess: cwd is the parent, paths are relative."""
    _pngs(tmp_path / arg.rstrip("/"), ["a.png", "b.png"])
    res = _run(["data", "prepare", arg, "--out", "prepared", "--size", "16"], cwd=tmp_path, home=tmp_path)
    assert res.returncode == 0, res.stderr
    s = json.loads((tmp_path / "prepared" / "summary.json").read_text())
    assert s["n_cases"] == 2 and s["skipped"] == []
    assert "prepared 2 cases (0 skipped" in res.stdout


@pytest.mark.parametrize("arg", ["./good", "good", "~/good", "sub/../good/"])
def test_other_relative_forms(tmp_path, monkeypatch, arg):
    from typer.testing import CliRunner

    from medfm.cli.app import app

    _pngs(tmp_path / "good", ["a.png", "b.png"])
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / ".medfm"))
    res = CliRunner().invoke(app, ["data", "prepare", arg, "--out", "prepared", "--size", "16"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "prepared" / "summary.json").read_text())["n_cases"] == 2


def test_zero_prepared_cases_exit_2_with_report(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from medfm.cli.app import app

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("not a picture")
    (tmp_path / "bad" / "y.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / ".medfm"))
    res = CliRunner().invoke(app, ["data", "prepare", "bad", "--out", "prepared", "--size", "16"])
    assert res.exit_code == 2
    reason = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(reason) == 1 and "no case could be prepared (2 skipped" in reason[0], res.output
    s = json.loads((tmp_path / "prepared" / "summary.json").read_text())
    assert s["n_cases"] == 0 and len(s["skipped"]) == 2


@pytest.mark.parametrize("strict", [False, True])
def test_strict_fails_when_anything_was_skipped(tmp_path, monkeypatch, strict):
    from typer.testing import CliRunner

    from medfm.cli.app import app

    _pngs(tmp_path / "mixed", ["a.png", "b.png"])
    (tmp_path / "mixed" / "x.png").write_text("not a picture")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / ".medfm"))
    args = ["data", "prepare", "mixed", "--out", "prepared", "--size", "16"]
    args += ["--strict"] if strict else []
    res = CliRunner().invoke(app, args)
    assert res.exit_code == (2 if strict else 0), res.output
    assert json.loads((tmp_path / "prepared" / "summary.json").read_text())["n_cases"] == 2  # still written
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == int(strict) and (not strict or "1 skipped with --strict" in errors[0])


def _doe_archive(root: Path) -> Path:
    from badinputs import make_dicom

    folder = root / "Doe_Janet_MRN12345"
    _pngs(folder, ["Doe_Janet_000.png", "Doe_Janet_001.png"])
    (folder / "Doe_Janet_002.png").write_text("broken")  # lands in the skipped list
    make_dicom(folder / "Doe_Janet_003.dcm", np.arange(256, dtype=np.uint16).reshape(16, 16))
    return folder


PLANTED = ("Doe", "Janet", "MRN12345")


def _hits(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in folder.rglob("*"):
        if p.is_file():
            data = p.read_bytes() + str(p.relative_to(folder)).encode()
            found = [w for w in PLANTED if w.encode() in data]
            if found:
                out[str(p)] = found
    return out


def test_folder_and_file_names_never_reach_the_dataset(tmp_path):
    src = _doe_archive(tmp_path / "archive")
    cfg = PrepareConfig(size=16, salt_file=str(tmp_path / "secret" / "salt"))
    s = prepare(src, tmp_path / "out", cfg, progress=False)
    assert s["n_cases"] == 3 and s["n_skipped"] == 1
    assert _hits(tmp_path / "out") == {}
    entry = s["skipped"][0]
    assert entry["case_id"].startswith("c_") and "<image>: " in entry["error"]
    # The way back lives beside the salt, outside the dataset, and is stable across runs.
    map_file = Path(s["case_map_file"])
    assert map_file.parent == tmp_path / "secret" and map_file.name == s["case_map"]
    back = json.loads(map_file.read_text())["cases"]
    assert set(back) >= {entry["case_id"]} and "Doe_Janet_002" in back[entry["case_id"]]["image"]
    import pandas as pd

    man = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert all(c in back and "MRN12345" in back[c]["image"] for c in man["case_id"])
    assert all(v.startswith("src_") for v in man["source"])
    prepare(src, tmp_path / "out2", cfg, progress=False)
    assert sorted(pd.read_parquet(tmp_path / "out2" / "manifest.parquet")["case_id"]) == sorted(
        man["case_id"]
    )


def test_keep_identifiers_keeps_names(tmp_path):
    src = _doe_archive(tmp_path / "archive")
    cfg = PrepareConfig(size=16, salt_file=str(tmp_path / "salt"), keep_identifiers=True)
    s = prepare(src, tmp_path / "out", cfg, progress=False)
    assert "case_map_file" not in s
    hits = _hits(tmp_path / "out")
    assert any("MRN12345" in found for found in hits.values())
    assert "Doe_Janet_002.png" in s["skipped"][0]["error"]


def test_manifest_paths_outside_its_folder_are_refused_per_row(tmp_path):
    """Issue 16 item 4: ../ escapes and absolute paths elsewhere are refused unless --allow-outside."""
    _pngs(tmp_path / "ds", ["a.png"])
    _pngs(tmp_path / "elsewhere", ["b.png"])
    rows = [
        "image",
        "a.png",
        "../elsewhere/b.png",
        str(tmp_path / "elsewhere" / "b.png"),
        "../" * 30 + "etc/passwd",
    ]
    (tmp_path / "ds" / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = PrepareConfig(size=16, salt_file=str(tmp_path / "salt"), keep_identifiers=True)
    s = prepare(tmp_path / "ds" / "manifest.csv", tmp_path / "o1", cfg, progress=False)
    assert s["n_cases"] == 1 and s["n_skipped"] == 3
    assert all("outside the manifest's folder (refused" in e["error"] for e in s["skipped"])
    assert any(e["error"].startswith("/etc/passwd:") for e in s["skipped"])
    cfg.allow_outside = [str(tmp_path / "elsewhere")]
    s = prepare(tmp_path / "ds" / "manifest.csv", tmp_path / "o2", cfg, progress=False)
    assert s["n_cases"] == 3 and [e["error"].startswith("/etc/passwd:") for e in s["skipped"]] == [True]
