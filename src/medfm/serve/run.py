"""`medfm serve` as a library call: load the engine once, build the app, run uvicorn on one port."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfm.serve.app import ServeConfig, create_app
from medfm.serve.auth import Tokens
from medfm.serve.engine import DEFAULT_MAX_PIXELS, Engine


def pacs_client(url: str, user: str = "", password: str = "", token: str = "", timeout: float = 10.0) -> Any:
    """A DICOMweb client from options, falling back to MEDFM_PACS_USER / _PASSWORD / _TOKEN."""
    from medfm.pacs.client import Pacs

    return Pacs(url, user=user or os.environ.get("MEDFM_PACS_USER") or None,
                password=password or os.environ.get("MEDFM_PACS_PASSWORD") or None,
                token=token or os.environ.get("MEDFM_PACS_TOKEN") or None, timeout=timeout)


def build(runs: list[str | Path], tokens_file: str | Path | None = None, pacs: Any = None,
          index_data: str | Path | None = None, ood_reference: str | Path | None = None,
          max_pixels: int = DEFAULT_MAX_PIXELS, cfg: ServeConfig | None = None) -> tuple[Any, str | None]:
    """(the app, the generated token or None when ``tokens_file`` gives them)."""
    engine = Engine.load(list(runs), index_data=index_data, ood_reference=ood_reference,
                         max_pixels=max_pixels)
    token = None
    if tokens_file:
        tokens = Tokens.from_file(tokens_file)
    else:
        tokens, token = Tokens.generated()
    cfg = cfg or ServeConfig()
    cfg.pacs = pacs
    return create_app(engine, tokens, cfg), token


def serve(runs: list[str | Path], host: str = "127.0.0.1", port: int = 8000,
          tokens_file: str | Path | None = None, pacs: Any = None, index_data: str | Path | None = None,
          ood_reference: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
          cfg: ServeConfig | None = None, echo: Callable[[str], Any] = print) -> None:
    """Run the service until interrupted."""
    import uvicorn

    app, token = build(runs, tokens_file, pacs, index_data, ood_reference, max_pixels, cfg)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    base = f"http://{host}:{port}"
    if token:
        echo(f"Token (read + write; shown once, pass --tokens FILE to manage your own): {token}")
        echo(f"Viewer: {base}/viewer?token={token}")
    else:
        echo(f"Viewer: {base}/viewer?token=<your token>")
    echo(f"API: {base}/docs (OpenAPI schema at {base}/openapi.json)")
    # access_log off: uvicorn's lines carry query strings (a login token); medfm.serve logs route templates
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
