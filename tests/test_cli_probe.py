"""`medfm data probe` lists real images and reports bad files without stopping."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from badinputs import write_png
from medfm.cli.app import app


def test_probe_lists_real_files_and_reports_bad_one(data_dir, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    series = data_dir / "volumes_3d" / "dicom_series_vs_seg_001"
    result = CliRunner().invoke(app, ["data", "probe", str(series), str(bad)], env={"COLUMNS": "200"})
    assert result.exit_code == 1  # one bad file -> non-zero, but the good one is still listed
    assert "dicom_series" in result.output
    assert "(1, 32, 512, 512)" in result.output
    assert f"{bad}  error: " in result.output


def test_probe_never_cuts_file_names_on_a_narrow_terminal(tmp_path):
    """Issue 16 item 8: names differing only at the end must stay distinguishable at 40 columns."""
    stem = "a_rather_long_folder_name_from_the_archive/series_of_the_same_patient_slice_"
    paths = []
    for k in range(2):
        p = tmp_path / f"{stem}{k:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        paths.append(write_png(p, np.zeros((12, 10), np.uint8)))
    result = CliRunner().invoke(app, ["data", "probe", *map(str, paths)], env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2
    for p, line in zip(paths, lines):
        assert line.startswith(f"{p}  png  shape (1, 12, 10)")
