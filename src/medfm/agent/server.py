"""`medfm mcp`: the served models and a study source as Model Context Protocol tools.

Every tool takes typed, described parameters (its input schema is a JSON Schema) and returns one JSON
object with a ``provenance`` record. A failure the caller can act on (an unknown study, a capability
that is not served, bad arguments) is a one-line tool error; a result that would reveal an identifier the
source has seen is withheld.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from medfm.agent import tools
from medfm.agent.studies import StudyNotFound, StudySource
from medfm.errors import InputError, MedfmError
from medfm.serve.engine import Engine

INSTRUCTIONS = (
    "Tools over medical images of studies in a PACS or folder, run by locally served models. Studies and "
    "patients are pseudonymous refs (st_..., pt_...) from list_studies. Every result carries a provenance "
    "record (tool, model name and hash, inputs, time); cite provenance.id. Outputs are research-model "
    "estimates, not diagnoses."
)

REF = "^st_[0-9a-f]{16}$"
Study = Annotated[str, Field(description="Study ref (st_...) from list_studies.", pattern=REF)]
Prior = Annotated[str, Field(description="Ref (st_...) of an earlier study of the same patient, from "
                             "get_priors.", pattern=REF)]
Findings = Annotated[list[str] | None, Field(
    description="Finding names to score (e.g. ['effusion', 'nodule']); default: the built-in set.")]
K = Annotated[int, Field(description="How many similar indexed cases to use.", ge=1, le=50)]


def _one_line(e: BaseException) -> str:
    text = e.problem if isinstance(e, InputError) else str(e)  # InputError's str() names the file
    if isinstance(e, KeyError | StudyNotFound) and e.args:
        text = str(e.args[0])
    return " ".join(text.split())[:300] or type(e).__name__


def _secrets(source: StudySource) -> set[str]:
    return {s for s in source.identifiers() if len(s) >= 5}  # shorter strings match by chance


def _guarded(engine: Engine, source: StudySource, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run a tool; known failures -> one-line ToolError; withhold any result or message with an identifier."""
    try:
        out = tools.call(engine, source, name, args)
    except (tools.ToolFailure, StudyNotFound, MedfmError) as e:
        msg = _one_line(e)
        raise ToolError(f"{name} failed" if tools.leaks(msg, _secrets(source)) else msg) from None
    if tools.leaks(out, _secrets(source)):
        raise ToolError(f"{name}: result withheld because it would reveal an identifier")
    return out


async def _one_line_errors(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """Tool errors as one line (the SDK's argument-validation errors span several, with links)."""
    result = await call_next(ctx)
    if ctx.method == "tools/call" and isinstance(result, dict) and result.get("isError"):
        for c in result.get("content") or []:
            if isinstance(c, dict) and isinstance(c.get("text"), str):
                text = re.sub(r"\s*\[type=[^\]]*\]|\s*For further information visit \S+", "", c["text"])
                c["text"] = " ".join(text.split())
    return result


def build_server(engine: Engine, source: StudySource, name: str = "medfm") -> MCPServer:
    """An MCP server whose tools run ``engine``'s models on ``source``'s studies."""
    server = MCPServer(name, instructions=INSTRUCTIONS, middleware=[_one_line_errors])

    def run(tool: str, **args: Any) -> dict[str, Any]:
        return _guarded(engine, source, tool, args)

    def add(fn: Callable[..., dict[str, Any]]) -> None:
        server.add_tool(fn, name=fn.__name__, structured_output=True)

    def list_studies() -> dict[str, Any]:
        """List the available studies: ref, date, modality, description, instance count and a pseudonymous
        patient ref. Identifiers are never returned."""
        return run("list_studies")

    def get_priors(
        patient: Annotated[str, Field(description="Patient ref (pt_...) from list_studies.",
                                      pattern="^pt_[0-9a-f]{16}$")],
        before_study: Annotated[str | None, Field(description="Only studies dated before this study "
                                                  "ref.", pattern=REF)] = None,
    ) -> dict[str, Any]:
        """Earlier studies of one pseudonymous patient, newest first."""
        return run("get_priors", patient=patient, before_study=before_study)

    def classify(study: Study) -> dict[str, Any]:
        """Finding probabilities from the served classifier on the study's first image (with an
        out-of-distribution check when a reference was fitted)."""
        return run("classify", study=study)

    def segment(study: Study) -> dict[str, Any]:
        """Segment the study's first image; the area fraction of each structure."""
        return run("segment", study=study)

    def zero_shot_findings(
        study: Study,
        findings: Findings = None,
    ) -> dict[str, Any]:
        """Probability of each finding from the image-text (CLIP) model's prompts, no training needed."""
        return run("zero_shot_findings", study=study, findings=findings)

    def similar_cases(study: Study, k: K = 5) -> dict[str, Any]:
        """The k indexed cases whose images are most similar, with their reports."""
        return run("similar_cases", study=study, k=k)

    def draft_report(study: Study, k: K = 5) -> dict[str, Any]:
        """A draft report composed from the k most similar indexed cases, each sentence citing its cases."""
        return run("draft_report", study=study, k=k)

    def explain(study: Study) -> dict[str, Any]:
        """Where the classifier looked: saliency peak and centroid (fractions of height/width), the share in
        the top 10% of pixels and, with a segmenter, the share inside the segmented structures."""
        return run("explain", study=study)

    def compare_with_prior(
        study: Study,
        prior: Prior,
        threshold: Annotated[float, Field(description="Probability change counted as increased/decreased.",
                                          gt=0, lt=1)] = tools.PROB_THRESHOLD,
        area_threshold: Annotated[float, Field(description="Area-fraction change counted as "
                                               "increased/decreased.", gt=0, lt=1)] = tools.AREA_THRESHOLD,
    ) -> dict[str, Any]:
        """Change since a prior study of the same patient: per finding probability and per segment area
        fraction, with current, prior, delta and increased/decreased/stable."""
        return run("compare_with_prior", study=study, prior=prior, threshold=threshold,
                   area_threshold=area_threshold)

    for fn in (list_studies, get_priors, classify, segment, zero_shot_findings, similar_cases, draft_report,
               explain, compare_with_prior):
        add(fn)
    return server


def open_source(studies: str | Path | None = None, pacs: str | None = None, user: str = "",
                password: str = "", salt: str | None = None) -> StudySource:
    """A FolderStudies (``studies``) or PacsStudies (``pacs`` URL) source; exactly one must be given."""
    from medfm.agent.studies import FolderStudies, PacsStudies
    from medfm.errors import ConfigError

    if (studies is None) == (not pacs):
        raise ConfigError("give exactly one of --studies FOLDER or --pacs URL")
    if studies is not None:
        if not Path(studies).is_dir():
            raise ConfigError(f"--studies {studies}: not a folder")
        return FolderStudies(studies, salt=salt)
    from medfm.serve.run import pacs_client

    return PacsStudies(pacs_client(str(pacs), user, password), salt=salt)


def run_stdio(runs: list[str | Path], studies: str | Path | None = None, pacs: str | None = None,
              user: str = "", password: str = "", index_data: str | Path | None = None,
              ood_reference: str | Path | None = None, salt: str | None = None) -> None:
    """Load the models, open the source and serve MCP over stdin/stdout until the host closes it."""
    source = open_source(studies, pacs, user, password, salt=salt)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the protocol: nothing else on it
            engine = Engine.load(list(runs), index_data=index_data, ood_reference=ood_reference)
        build_server(engine, source).run("stdio")
    finally:
        source.close()
