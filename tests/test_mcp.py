"""`medfm mcp` through the SDK's in-memory client: a phantom folder of DICOM studies made from real chest
X-rays (two studies of one fake patient a year apart, one of another), every tool with a JSON input schema
and provenance and no identifier in any answer, priors by pseudonymous patient, changes since the prior,
tool errors instead of crashes, and the scripted read citing the tool results it rests on."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

import serve_world
from badinputs import make_dicom

NAME, PID = "Test^Patient", "P-TEST-001"
OTHER_NAME, OTHER_PID = "Other^Person", "P-OTHER-002"
STUDY_RE = "st_0123456789abcdef"  # well formed, unknown


def _dx(path: Path, image: str, name: str, pid: str, date: str, description: str) -> Path:
    img = Image.open(image).convert("L")
    img.thumbnail((512, 512))  # real pixels, small files
    ids = {"PatientName": name, "PatientID": pid, "PatientBirthDate": "19700101",
           "AccessionNumber": f"ACC{date}", "StudyDate": date}
    return make_dicom(path, np.asarray(img).astype(np.uint16) * 16, modality="DX", identifiers=ids,
                      StudyDescription=description, spacing=(0.2, 0.2))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return serve_world.build(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def engine(world):
    return serve_world.load_engine(world)


@pytest.fixture(scope="module")
def folder(world, tmp_path_factory) -> Path:
    """Patient A: 2023 and 2024 (one DX instance each); patient B: 2024. File names carry identifiers."""
    images = list(pd.read_csv(world["manifest"]).image)
    last = serve_world.first_image(world)
    before = images[images.index(str(last)) - 1]
    root = tmp_path_factory.mktemp("studies")
    (root / "a").mkdir()
    _dx(root / "a" / f"{PID}_2023.dcm", before, NAME, PID, "20230310", "CHEST PA")
    _dx(root / "a" / f"{PID}_2024.dcm", str(last), NAME, PID, "20240312", "CHEST PA follow-up")
    _dx(root / f"{OTHER_PID}.dcm", images[0], OTHER_NAME, OTHER_PID, "20240101", f"Chest {OTHER_NAME}")
    (root / "notes.txt").write_text("not a DICOM file")
    return root


@pytest.fixture(scope="module")
def source(folder):
    from medfm.agent.studies import FolderStudies

    with FolderStudies(folder) as s:
        yield s


@pytest.fixture(scope="module")
def server(engine, source):
    from medfm.agent.server import build_server

    return build_server(engine, source)


def forbidden(folder: Path) -> list[str]:
    return [NAME, PID, "Test", OTHER_NAME, OTHER_PID, "19700101", "ACC20", ".dcm", str(folder), folder.name]


def run_client(server, fn) -> Any:
    """fn(client) inside an in-memory MCP client session (JSON-RPC framing, as over stdio)."""
    from mcp import Client

    async def main():
        async with Client(server, mode="legacy") as client:
            return await fn(client)

    return anyio.run(main)


def refs(source) -> dict[str, Any]:
    rows = source.list_studies()
    by_date = {r["date"]: r for r in rows}
    return {"old": by_date["2023-03-10"], "new": by_date["2024-03-12"], "other": by_date["2024-01-01"]}


def examples(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    new, old = r["new"]["study"], r["old"]["study"]
    return {"list_studies": {}, "get_priors": {"patient": r["new"]["patient"], "before_study": new},
            "classify": {"study": new}, "segment": {"study": new},
            "zero_shot_findings": {"study": new, "findings": ["effusion", "nodule"]},
            "similar_cases": {"study": new, "k": 3}, "draft_report": {"study": new, "k": 3},
            "explain": {"study": new}, "compare_with_prior": {"study": new, "prior": old}}


def test_listing_is_pseudonymous(source, folder):
    from medfm.agent.tools import leaks

    rows = source.list_studies()
    assert len(rows) == 3
    assert all(r["study"].startswith("st_") and r["patient"].startswith("pt_") for r in rows)
    r = refs(source)
    assert r["old"]["patient"] == r["new"]["patient"] != r["other"]["patient"]
    assert r["new"]["modality"] == "DX" and r["new"]["n_instances"] == 1
    assert r["other"]["description"] is None  # it named the patient
    assert leaks(rows, forbidden(folder)) == []
    assert leaks({"a": [{"b": f"x{PID}y"}]}, [PID]) == ["$.a[0].b"]  # the checker finds nested values


def test_tools_have_json_schemas_that_validate(server, source):
    from medfm.agent.tools import TOOL_NAMES

    listed = run_client(server, lambda c: c.list_tools())
    tools = {t.name: t for t in listed.tools}
    assert set(tools) == set(TOOL_NAMES)
    ex = examples(refs(source))
    wrong = {"get_priors": {"patient": 7}, "classify": {"study": 3}, "segment": {},
             "zero_shot_findings": {"study": ex["classify"]["study"], "findings": "effusion"},
             "similar_cases": {"study": ex["classify"]["study"], "k": "five"},
             "draft_report": {"study": ex["classify"]["study"], "k": 0}, "explain": {"study": None},
             "compare_with_prior": {"study": ex["classify"]["study"], "prior": ex["classify"]["study"],
                                    "threshold": "big"}}
    for name, tool in tools.items():
        schema = tool.input_schema
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object" and tool.description
        assert all(p.get("description") for p in schema.get("properties", {}).values()), name
        v = jsonschema.Draft202012Validator(schema)
        v.validate(ex[name])
        if name in wrong:
            assert not v.is_valid(wrong[name]), name

    async def bad(c):
        return await c.call_tool("similar_cases", wrong["similar_cases"])

    res = run_client(server, bad)
    assert res.is_error  # the server enforces the schema too


def test_every_tool_once_with_provenance_and_no_identifier(server, source, folder):
    from medfm.agent.tools import leaks

    ex = examples(refs(source))

    async def all_tools(c):
        return {name: await c.call_tool(name, args) for name, args in ex.items()}

    out = run_client(server, all_tools)
    for name, res in out.items():
        assert not res.is_error, (name, res.content)
        r = res.structured_content
        p = r["provenance"]
        assert p["tool"] == name and p["id"] and p["time"] and isinstance(p["inputs"], list)
        if name not in ("list_studies", "get_priors"):
            models = p["model"] if isinstance(p["model"], list) else [p["model"]]
            assert models and all(set(m) == {"name", "hash"} for m in models), name
            assert ex[name]["study"] in p["inputs"] and any(i.startswith("in_") for i in p["inputs"])
        wire = json.dumps(res.model_dump(mode="json"))
        assert leaks(r, forbidden(folder)) == [] and leaks(wire, forbidden(folder)) == [], name
    e = out["explain"].structured_content
    assert 0 <= e["peak"]["row"] <= 1 and 0 <= e["share_inside_mask"] <= 1 and "saliency" not in e
    assert out["draft_report"].structured_content["report"]
    assert len(out["similar_cases"].structured_content["cases"]) == 3


def test_priors_are_the_same_pseudonymous_patients(server, source):
    r = refs(source)

    async def priors(c):
        new = r["new"]
        a = await c.call_tool("get_priors", {"patient": new["patient"], "before_study": new["study"]})
        b = await c.call_tool("get_priors", {"patient": r["other"]["patient"]})
        return a.structured_content, b.structured_content

    a, b = run_client(server, priors)
    assert [p["study"] for p in a["priors"]] == [r["old"]["study"]]
    assert [p["study"] for p in b["priors"]] == [r["other"]["study"]]


def test_compare_with_prior_per_finding_deltas(server, source, engine):
    r = refs(source)

    async def cmp(c):
        args = {"study": r["new"]["study"], "prior": r["old"]["study"], "threshold": 0.01}
        return (await c.call_tool("compare_with_prior", args)).structured_content

    out = run_client(server, cmp)
    assert [f["name"] for f in out["findings"]] == ["tuberculosis"]
    for item in out["findings"] + out["segments"]:
        assert item["delta"] == pytest.approx(item["current"] - item["prior"], abs=1e-5)
        assert item["change"] in ("increased", "decreased", "stable")
    f = out["findings"][0]
    want = "stable" if abs(f["delta"]) <= 0.01 else "increased" if f["delta"] > 0 else "decreased"
    assert f["change"] == want
    assert out["dates"] == {"current": "2024-03-12", "prior": "2023-03-10"}
    assert out["segments"][0]["name"] == engine.segment_names(engine.model(None, "segment"))[0]


def test_errors_are_one_line_tool_errors(server, source, engine, folder):
    from medfm.agent.server import build_server
    from medfm.serve.engine import Engine

    r = refs(source)
    clip_only = build_server(Engine([m for m in engine.models if m.name == "clip"], salt=engine.salt), source)

    async def errors(c):
        return [await c.call_tool("classify", {"study": STUDY_RE}),
                await c.call_tool("classify", {"study": "CHNCXR_0001_0.png"}),
                await c.call_tool("get_priors", {"patient": "pt_0123456789abcdef"}),
                await c.call_tool("compare_with_prior", {"study": r["new"]["study"],
                                                         "prior": r["other"]["study"]}),
                await c.call_tool("list_studies", {})]

    *bad, ok = run_client(server, errors)
    for res in bad:
        text = res.content[0].text
        assert res.is_error and "\n" not in text and "Traceback" not in text and str(folder) not in text
    assert STUDY_RE in bad[0].content[0].text and not ok.is_error  # the server is still up

    async def not_served(c):
        return await c.call_tool("segment", {"study": r["new"]["study"]})

    res = run_client(clip_only, not_served)
    assert res.is_error and "segment" in res.content[0].text


def test_scripted_read_through_the_client_cites_its_results(server, source, folder):
    from medfm.agent.plan import client_call, read_study
    from medfm.agent.tools import leaks

    study = refs(source)["new"]["study"]

    async def read(c):
        t = time.perf_counter()
        out = await read_study(client_call(c), study)
        return out, time.perf_counter() - t

    out, took = run_client(server, read)
    print(f"scripted read through the MCP client: {took:.2f} s, {len(out['sentences'])} sentences")
    assert took < 30
    assert out["skipped"] == {}
    tools = {r["provenance"]["tool"] for r in out["results"].values()}
    assert tools == {"list_studies", "get_priors", "classify", "segment", "compare_with_prior",
                     "draft_report"}
    for s in out["sentences"]:
        assert s["text"] and s["cites"] and all(c in out["results"] for c in s["cites"]), s
    assert any(s["text"].startswith("Since the prior") for s in out["sentences"])
    assert leaks(out, forbidden(folder)) == []


def test_direct_read_without_a_prior_skips_compare(engine, source):
    from medfm.agent.plan import direct_call, read_study_sync

    out = read_study_sync(direct_call(engine, source), refs(source)["old"]["study"])
    assert "No earlier study of this patient." in [s["text"] for s in out["sentences"]]
    assert "compare_with_prior" not in {r["provenance"]["tool"] for r in out["results"].values()}


class FakePacs:
    """What PacsStudies needs of medfm.pacs.client.Pacs, served from the phantom folder."""

    def __init__(self, folder: Path) -> None:
        self.ds = [pydicom.dcmread(p) for p in sorted(folder.rglob("*.dcm"))]

    def studies(self, identifiers: bool = False) -> list[dict[str, Any]]:
        return [{"StudyInstanceUID": d.StudyInstanceUID, "StudyDate": d.StudyDate, "ModalitiesInStudy": "DX",
                 "NumberOfStudyRelatedInstances": 1, **({"PatientID": d.PatientID} if identifiers else {})}
                for d in self.ds]

    def instances(self, study: str, series: str | None = None) -> list[dict[str, Any]]:
        return [{"SeriesInstanceUID": d.SeriesInstanceUID, "SOPInstanceUID": d.SOPInstanceUID,
                 "Modality": d.Modality, "InstanceNumber": 1} for d in self.ds if d.StudyInstanceUID == study]

    def retrieve_instance(self, study: str, series: str, sop: str) -> pydicom.Dataset:
        return next(d for d in self.ds if d.SOPInstanceUID == sop)


def test_pacs_source_matches_the_folder(folder, source):
    from medfm.agent.studies import PacsStudies, StudyNotFound

    pacs = PacsStudies(FakePacs(folder), salt=source.salt)
    assert {(r["study"], r["patient"], r["date"]) for r in pacs.list_studies()} == {
        (r["study"], r["patient"], r["date"]) for r in source.list_studies()}
    new = refs(source)["new"]
    assert [p["study"] for p in pacs.priors(new["patient"], new["study"])] == [refs(source)["old"]["study"]]
    f = pacs.fetch(new["study"])
    assert pydicom.dcmread(f).PatientID == PID and NAME in pacs.identifiers()
    with pytest.raises(StudyNotFound):
        pacs.fetch(STUDY_RE)
    pacs.close()
    assert not f.exists()
