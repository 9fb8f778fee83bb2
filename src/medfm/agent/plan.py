"""A scripted read of one study (no language model): list_studies -> get_priors -> classify -> segment ->
compare_with_prior (when a prior exists) -> draft_report, written up as short sentences that each cite the
tool results (``provenance.id``) they rest on.

``call(tool_name, args) -> result dict`` may be sync or async, so the same plan runs through an MCP client
(:func:`client_call`) or straight on an engine and a source (:func:`direct_call`). A step that fails
(a capability that is not served) is skipped and noted; only an unknown study stops the read.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

Call = Callable[[str, dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]
NOTE = "Automated read by research models: estimates to check, not a diagnosis."


class StepFailed(Exception):
    """A tool call answered with an error (one line)."""


def client_call(client: Any) -> Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]:
    """An async ``call`` over an MCP client session (``mcp.Client``): tool errors raise StepFailed."""

    async def call(tool: str, args: dict[str, Any]) -> dict[str, Any]:
        res = await client.call_tool(tool, args)
        if res.is_error:
            text = " ".join(getattr(c, "text", "") for c in res.content).strip()
            raise StepFailed(text or f"{tool} failed")
        return dict(res.structured_content or {})

    return call


def direct_call(engine: Any, source: Any) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    """A sync ``call`` running the tools in-process, with the server's identifier guard."""
    from mcp.server.mcpserver.exceptions import ToolError

    from medfm.agent.server import _guarded

    def call(tool: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return _guarded(engine, source, tool, args)
        except ToolError as e:
            raise StepFailed(str(e)) from None

    return call


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _findings(r: dict[str, Any]) -> str:
    return "; ".join(f"{f['name']} {f['probability']:.2f} ({'positive' if f['positive'] else 'negative'})"
                     for f in r["findings"])


def _changes(items: list[dict[str, Any]], fmt: Callable[[float | None], str]) -> str:
    return "; ".join(f"{i['name']} {i['change']} ({fmt(i['prior'])} -> {fmt(i['current'])})" for i in items)


async def read_study(call: Call, study_ref: str) -> dict[str, Any]:
    """Read one study end to end: {study, sentences: [{text, cites}], results: {id: result}, skipped, note}.

    Await it; with a sync ``call`` outside an event loop, :func:`read_study_sync` does that for you.
    """
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    sentences: list[dict[str, Any]] = []

    async def step(tool: str, args: dict[str, Any], required: bool = False) -> dict[str, Any] | None:
        try:
            r = call(tool, args)
            r = await r if inspect.isawaitable(r) else r
        except StepFailed as e:
            if required:
                raise
            skipped[tool] = str(e)
            return None
        results[r["provenance"]["id"]] = r
        return r

    def say(text: str, *cited: dict[str, Any]) -> None:
        sentences.append({"text": text, "cites": [r["provenance"]["id"] for r in cited]})

    listing = await step("list_studies", {}, required=True)
    assert listing is not None
    row = next((r for r in listing["studies"] if r["study"] == study_ref), None)
    if row is None:
        raise StepFailed(f"no study {study_ref!r} in list_studies")
    say(f"Study {study_ref}: {row['modality'] or 'unknown modality'} of {row['date'] or 'unknown date'}, "
        f"{row['n_instances']} instance(s), patient {row['patient']}.", listing)

    priors = await step("get_priors", {"patient": row["patient"], "before_study": study_ref})
    prior = priors["priors"][0] if priors and priors["priors"] else None
    if priors is not None:
        say(f"{len(priors['priors'])} earlier stud{'y' if len(priors['priors']) == 1 else 'ies'} of this "
            f"patient; the most recent is {prior['study']} of {prior['date']}." if prior
            else "No earlier study of this patient.", priors)

    clf = await step("classify", {"study": study_ref})
    if clf is not None:
        say(f"Classifier findings: {_findings(clf)}.", clf)
        if "ood" in clf:
            o = clf["ood"]
            say(f"The image is {'outside' if o['out_of_distribution'] else 'within'} the classifier's "
                f"reference distribution (score {o['score']:.1f}, threshold {o['threshold']:.1f}).", clf)

    seg = await step("segment", {"study": study_ref})
    if seg is not None:
        say("Segmentation: " + "; ".join(f"{n} covers {_pct(a)} of the image"
                                         for n, a in seg["area_fraction"].items()) + ".", seg)

    if prior is not None:
        cmp = await step("compare_with_prior", {"study": study_ref, "prior": prior["study"]})
        if cmp is not None:
            parts = [_changes(cmp.get("findings", []), lambda v: "n/a" if v is None else f"{v:.2f}"),
                     _changes([{**s, "name": f"{s['name']} area"} for s in cmp.get("segments", [])], _pct)]
            say(f"Since the prior of {cmp['dates']['prior']}: {'; '.join(p for p in parts if p)} "
                f"(thresholds: probability {cmp['thresholds']['probability']}, area "
                f"{cmp['thresholds']['area_fraction']}).", cmp, *([priors] if priors else []))

    rep = await step("draft_report", {"study": study_ref, "k": 5})
    if rep is not None:
        say(f"Draft report from {len(rep['cited_cases'])} cited similar case(s): "
            f"{' '.join(rep['report'].split())}", rep)

    return {"study": study_ref, "sentences": sentences, "results": results, "skipped": skipped, "note": NOTE}


def read_study_sync(call: Call, study_ref: str) -> dict[str, Any]:
    """:func:`read_study` from synchronous code (no running event loop)."""
    return asyncio.run(read_study(call, study_ref))
