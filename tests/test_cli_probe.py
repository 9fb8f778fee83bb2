"""`medfm data probe` lists real images and reports bad files without stopping."""

from __future__ import annotations

from typer.testing import CliRunner

from medfm.cli.app import app


def test_probe_lists_real_files_and_reports_bad_one(data_dir, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    series = data_dir / "volumes_3d" / "dicom_series_vs_seg_001"
    result = CliRunner().invoke(app, ["data", "probe", str(series), str(bad)], env={"COLUMNS": "200"})
    assert result.exit_code == 1  # one bad file -> non-zero, but the good one is still listed
    assert "dicom_series" in result.output
    assert "(1, 32, 512, 512)" in result.output
    assert "notes.png" in result.output and "error" in result.output
