"""Run `medfm ARGS` through the real console entry point inside a test (shared by test modules)."""

from __future__ import annotations

import sys

import pytest


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`medfm ARGS` through the real entry point (errors -> one line on stderr, exit code 2)."""
    from medfm.cli.app import main

    monkeypatch.setattr(sys, "argv", ["medfm", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err
