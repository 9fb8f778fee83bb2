"""CLI: `medfm mcp` (the served models and a study source as MCP tools over stdio, for agent hosts)."""

from __future__ import annotations

from pathlib import Path

import typer


def mcp(
    runs: list[Path] = typer.Argument(..., help="Run directories or exported models to serve (classifier, "
                                      "segmenter, CLIP...). Each is loaded once."),
    studies: Path = typer.Option(None, help="Folder of DICOM studies (grouped by StudyInstanceUID)."),
    pacs: str = typer.Option("", help="DICOMweb base URL of the PACS instead of --studies."),
    user: str = typer.Option("", help="PACS user (or MEDFM_PACS_USER)."),
    password: str = typer.Option("", help="PACS password (or MEDFM_PACS_PASSWORD)."),
    index: Path = typer.Option(None, help="Image-report pairs for similar cases and draft reports (CLIP)."),
    ood_reference: Path = typer.Option(None, help="Prepared dataset the OOD score is fitted on."),
) -> None:
    """Serve the models as Model Context Protocol tools over stdin/stdout (what agent hosts launch):
    list studies, priors, classify, segment, zero-shot findings, similar cases, draft report, explain,
    compare with prior. Studies and patients appear only as salted pseudonyms; every result carries
    provenance."""
    from medfm.agent.server import run_stdio

    run_stdio(list(runs), studies=studies, pacs=pacs or None, user=user, password=password, index_data=index,
              ood_reference=ood_reference)


def register(app: typer.Typer) -> None:
    app.command("mcp")(mcp)
