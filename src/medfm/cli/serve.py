"""CLI: `medfm serve` (the model service and web viewer) and `medfm token` (manage its bearer tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def serve(
    runs: list[Path] = typer.Argument(..., help="Run directories or exported models to serve (classifier, "
                                      "segmenter, promptable, CLIP, encoder). Each is loaded once."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="TCP port."),
    tokens: Path = typer.Option(None, "--tokens", help="Tokens file (`medfm token`); without it one "
                                "read+write token is generated and printed."),
    pacs: str = typer.Option("", help="DICOMweb base URL of the PACS (e.g. http://127.0.0.1:8042/dicom-web)."),
    pacs_user: str = typer.Option("", help="PACS user (or MEDFM_PACS_USER)."),
    pacs_password: str = typer.Option("", help="PACS password (or MEDFM_PACS_PASSWORD)."),
    index: Path = typer.Option(None, help="Image-report pairs for similar cases and draft reports (CLIP)."),
    ood_reference: Path = typer.Option(None, help="Prepared dataset the OOD score is fitted on."),
    max_upload_mb: float = typer.Option(64.0, help="Largest upload accepted (MB)."),
    max_pixels: int = typer.Option(2**27, help="Most decoded pixels / voxels per input (bomb guard)."),
    timeout: float = typer.Option(60.0, help="Seconds before a request gives up (504)."),
    max_batch: int = typer.Option(16, help="Micro-batch: most concurrent images per forward pass (1: off)."),
    max_wait_ms: float = typer.Option(5.0, help="Micro-batch: how long the first request waits for others."),
) -> None:
    """Serve models over HTTP: classify, segment, explain, OOD, zero-shot, similar cases, draft reports;
    a DICOMweb bridge to the PACS (--pacs) and a web viewer at /viewer. Every request needs a bearer
    token; `write` scope is needed to store results in the PACS."""
    from medfm.serve.app import ServeConfig
    from medfm.serve.run import pacs_client
    from medfm.serve.run import serve as run_serve

    client = pacs_client(pacs, pacs_user, pacs_password) if pacs else None
    cfg = ServeConfig(max_upload_bytes=int(max_upload_mb * 2**20), timeout_s=timeout, max_batch=max_batch,
                      max_wait_ms=max_wait_ms)
    run_serve(list(runs), host=host, port=port, tokens_file=tokens, pacs=client, index_data=index,
              ood_reference=ood_reference, max_pixels=max_pixels, cfg=cfg, echo=typer.echo)


def token(
    tokens: Path = typer.Argument(..., help="Tokens file (created if missing)."),
    name: str = typer.Option(..., help="Who the token is for (appears in the service log)."),
    scope: list[str] = typer.Option(["read"], help="read (run models, read the PACS) and/or write "
                                    "(store results in the PACS)."),
) -> None:
    """Add a bearer token to a tokens file; the file keeps only its hash, the token is printed once."""
    from medfm.errors import ConfigError
    from medfm.serve.auth import SCOPES, make_token_entry

    bad = sorted(set(scope) - set(SCOPES))
    if bad:
        raise ConfigError(f"unknown scope(s) {', '.join(bad)}; choose from {', '.join(SCOPES)}")
    data = json.loads(tokens.read_text()) if tokens.is_file() else {"tokens": []}
    secret, entry = make_token_entry(name, scope)
    data["tokens"].append(entry)
    tokens.write_text(json.dumps(data, indent=2))
    tokens.chmod(0o600)
    typer.echo(secret)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("token")(token)
