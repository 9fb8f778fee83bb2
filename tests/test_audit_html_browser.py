"""audit.html in a real browser: headless Chromium renders the page `run_audit` writes, every section is in
the rendered DOM, and the screenshot is a page, not a blank.

Chromium runs offline (file:// only, every host name unresolvable, its own profile folder) under a time
limit. Without /usr/bin/chromium the test is skipped on a developer machine but fails in CI (CI=true), where
`make test` installs it (Debian package ``chromium``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SECTIONS = ("summary", "cross-site", "shift", "ood", "fairness", "calibration", "explanations", "shortcuts",
            "mitigation")
TIMEOUT_S = 90


def chromium() -> str:
    path = os.environ.get("MEDFM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"headless Chromium not found at {path}: CI must install it (make test does)")
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    return path


def run_chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Chromium headless on a local file, with no network and a bounded run time."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-extensions", "--disable-background-networking", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
           "--window-size=1280,2000", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


class _Ids(HTMLParser):
    """Element ids, and the text inside each, of a rendered DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.imgs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "img" and a.get("src"):
            self.imgs.append(str(a["src"]))


@pytest.fixture(scope="module")
def audit_html(tmp_path_factory) -> Path:
    """An audit of a tiny phantom classifier on its own store and on a second phantom batch."""
    import torch

    pytest.importorskip("medfm.audit.run")
    from medfm.audit.run import AuditConfig, run_audit
    from medfm.data.phantom import write_phantom
    from medfm.data.prepare import PrepareConfig, prepare
    from medfm.models import create_encoder
    from medfm.tasks.adapt.single import fit_classifier

    d = tmp_path_factory.mktemp("audit_browser")
    stores = []
    for name, seed in (("ref", 0), ("new", 1)):
        write_phantom("cxr", 72, d / f"{name}_raw", seed=seed, size=32)
        prepare(d / f"{name}_raw", d / name, PrepareConfig(size=32, labels=["nodule"]), progress=False)
        stores.append(d / name)
    torch.manual_seed(0)
    enc = create_encoder("resnet18", img_size=32, small_input=True, width=8)
    fit_classifier(enc, stores[0], d / "model", method="linear")
    cfg = AuditConfig(n_boot=20, n_perm=20, n_explain=2, min_group=5)
    run_audit(d / "model", stores, d / "audit", cfg)
    page = d / "audit" / "audit.html"
    assert page.is_file()
    return page


def test_every_section_renders_in_chromium(audit_html, tmp_path):
    res = run_chromium(audit_html, tmp_path / "profile", "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    dom = _Ids()
    dom.feed(res.stdout)
    missing = [s for s in SECTIONS if s not in dom.ids]
    assert not missing, f"sections missing from the rendered DOM: {missing}"
    # Self-contained: every image is embedded or beside the page, none fetched from the network.
    for src in dom.imgs:
        assert src.startswith("data:image/") or (audit_html.parent / src).is_file(), src[:80]


def test_screenshot_is_not_blank(audit_html, tmp_path):
    shot = tmp_path / "audit.png"
    res = run_chromium(audit_html, tmp_path / "profile", f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape == (2000, 1280)
    # A rendered report has text and figures: many grey levels and real contrast, unlike a blank page.
    assert len(np.unique(img)) > 16 and img.std() > 10
    assert (img < 128).mean() > 0.005  # some dark ink (text, plots) on the page
