"""Errors that users see. Each names the file (or item) and the problem in one line."""

from __future__ import annotations

from pathlib import Path


class MedfmError(Exception):
    """Base class for errors medfm reports to users (the CLI prints them without a traceback)."""


class InputError(MedfmError):
    """A bad input file: unreadable, truncated, wrong format, absurd size, NaN pixels..."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(MedfmError):
    """A bad option or configuration value."""


class PacsError(MedfmError):
    """A PACS (DICOMweb) request that failed: unreachable, refused credentials, HTTP error, bad answer.

    ``url`` never carries credentials; the message is one line.
    """

    def __init__(self, url: str | None, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"{url}: {problem}" if url else problem)
