"""The HTTP service (`medfm serve`): FastAPI over one Engine, with bearer-token scopes, upload limits,
micro-batched classification, timeouts, Prometheus metrics, a DICOMweb bridge and the web viewer.

Every request is authenticated (header ``Authorization: Bearer <token>``, or the cookie the viewer's login
sets). Errors are ``{"detail": "<one line>"}`` with a 4xx/5xx status; no response or log line carries a file
name, a path or a DICOM identifier.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from medfm.errors import ConfigError, InputError, MedfmError
from medfm.serve.auth import COOKIE, Grant, Tokens
from medfm.serve.batching import MicroBatcher
from medfm.serve.engine import Engine
from medfm.serve.metrics import Metrics

log = logging.getLogger("medfm.serve")
VIEWER = Path(__file__).parent / "viewer"
UPLOAD_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii", ".gz", ".npz", ".npy"}


@dataclass
class ServeConfig:
    max_upload_bytes: int = 64 * 2**20
    timeout_s: float = 60.0
    max_batch: int = 16  # 1: no micro-batching
    max_wait_ms: float = 5.0
    pacs: Any = None  # a medfm.pacs.client.Pacs, or None
    extra: dict[str, Any] = field(default_factory=dict)


class HttpError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _one_line(e: BaseException, tmp: str | None = None) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.replace(f"{tmp}/", "").replace(tmp, "upload") if tmp else text


def _status_of(e: MedfmError) -> int:
    text = str(e)
    if "exceed" in text or "decompression bomb" in text or "too large" in text:
        return 413
    if isinstance(e, ConfigError) and ("no served model" in text or "no model named" in text):
        return 404
    return 400 if isinstance(e, InputError) else 422


def png_b64(rgba: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mask_rgba(mask: np.ndarray) -> np.ndarray:
    """Label map -> translucent colours (label 0 transparent)."""
    palette = np.array([[0, 0, 0, 0], [255, 64, 64, 110], [64, 160, 255, 110], [64, 255, 120, 110],
                        [255, 200, 0, 110], [200, 64, 255, 110]], np.uint8)
    return palette[np.minimum(mask.astype(np.int64), len(palette) - 1)]


def heat_rgba(sal: np.ndarray) -> np.ndarray:
    """Saliency in [0, 1] -> a red-yellow heat map whose opacity grows with the value."""
    s = np.clip(sal, 0, 1)
    rgba = np.stack([np.full_like(s, 255), 255 * s, np.zeros_like(s), 180 * s], -1)
    return rgba.astype(np.uint8)


def create_app(engine: Engine, tokens: Tokens, cfg: ServeConfig | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()
    metrics = Metrics()
    batchers: dict[str, MicroBatcher] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for b in batchers.values():
            await b.close()

    app = FastAPI(title="medfm", version="1", lifespan=lifespan,
                  description="Medical imaging foundation models as a service. Every request needs a "
                              "bearer token; `write` scope stores results in the PACS.")

    # auth, limits, metrics and the log line: one pure-ASGI middleware in front of every request
    app.add_middleware(Guard, tokens=tokens, cfg=cfg, metrics=metrics,
                       route_of=lambda sc: _route_name(app, sc))

    @app.exception_handler(HttpError)
    async def _http_error(request: Request, e: HttpError) -> JSONResponse:
        return JSONResponse({"detail": e.detail}, e.status)

    def need(scope: str) -> Any:
        def check(request: Request) -> Grant:
            grant: Grant = request.state.grant
            if scope not in grant.scopes:
                raise HttpError(403, f"token '{grant.name}' lacks the '{scope}' scope")
            return grant
        return Depends(check)

    read = need("read")

    # ---- running work: in a thread, under a timeout, errors as one line -------------------------------
    async def run(fn: Any, *args: Any, tmp: str | None = None, **kw: Any) -> Any:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kw), cfg.timeout_s)
        except TimeoutError:
            raise HttpError(504, f"timed out after {cfg.timeout_s:g} s") from None
        except MedfmError as e:
            raise HttpError(_status_of(e), _one_line(e, tmp)) from None

    @asynccontextmanager
    async def input_file(file: UploadFile | None, study: str, series: str, instance: str
                         ) -> AsyncIterator[Path]:
        """The request's image as a file in a private temp folder: an upload (size-limited, checked before
        decoding) or a DICOMweb instance fetched from the PACS."""
        tmp = tempfile.mkdtemp(prefix="medfm-serve-")
        try:
            if file is not None and file.filename is not None:
                suffix = "".join(Path(file.filename).suffixes[-2:]).lower()
                suffix = suffix if all(s in UPLOAD_SUFFIXES for s in Path(suffix).suffixes) else ""
                path = Path(tmp) / f"upload{suffix}"
                n = 0
                with open(path, "wb") as f:
                    while chunk := await file.read(1 << 20):
                        n += len(chunk)
                        if n > cfg.max_upload_bytes:
                            raise HttpError(413, f"upload larger than {cfg.max_upload_bytes} bytes")
                        f.write(chunk)
                if n == 0:
                    raise HttpError(400, "empty upload")
            elif study and instance:
                path = await run(_fetch_instance, study, series, instance, Path(tmp), tmp=tmp)
            else:
                raise HttpError(400, "send an image file (form field 'file') or a DICOMweb reference "
                                "(study, series, instance)")
            await run(engine.check, path, tmp=tmp)
            yield path
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _fetch_instance(study: str, series: str, instance: str, folder: Path) -> Path:
        if cfg.pacs is None:
            raise ConfigError("no PACS configured: start the service with --pacs URL")
        ds = cfg.pacs.retrieve_instance(study, series, instance)
        path = folder / "instance.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    def batcher(m: Any) -> MicroBatcher:
        if m.name not in batchers:
            batchers[m.name] = MicroBatcher(lambda x, m=m: engine.infer_classify(m, x), cfg.max_batch,
                                            cfg.max_wait_ms, on_batch=metrics.batch.observe)
        return batchers[m.name]

    # ---- service endpoints ---------------------------------------------------------------------------
    @app.get("/health", tags=["service"])
    def health(g: Grant = read) -> dict[str, Any]:
        return {"status": "ok", "models": engine.describe(), "pacs": cfg.pacs is not None}

    @app.get("/metrics", tags=["service"])
    def prometheus(g: Grant = read) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", tags=["service"])
    def models(g: Grant = read) -> list[dict[str, Any]]:
        return engine.describe()

    # One input path for every capability: a multipart upload `file`, or study/series/instance of the PACS.
    def src(file: UploadFile | None = File(None), study: str = Form(""), series: str = Form(""),
            instance: str = Form("")) -> tuple:
        return file, study, series, instance

    @app.post("/v1/classify", tags=["models"])
    async def classify(s: tuple = Depends(src), model: str = Form(""), g: Grant = read) -> dict[str, Any]:
        async with input_file(*s) as path:
            m, x = await run(engine.prepare_classify, path, model or None, tmp=str(path.parent))
            try:
                probs = await asyncio.wait_for(batcher(m).submit(x), cfg.timeout_s)
            except TimeoutError:
                raise HttpError(504, f"timed out after {cfg.timeout_s:g} s") from None
            return {"findings": engine.findings(m, probs), "model": m.stamp(),
                    "input": await run(engine.input_id, path)}

    @app.post("/v1/segment", tags=["models"])
    async def segment(s: tuple = Depends(src), model: str = Form(""), boxes: str = Form(""),
                      overlay: bool = Form(True), g: Grant = read) -> dict[str, Any]:
        """Dense segmentation, or with ``boxes`` (JSON [[x0, y0, x1, y1], ...] in image pixels) a
        promptable model's masks inside the boxes."""
        try:
            bx = json.loads(boxes) if boxes else None
        except ValueError:
            raise HttpError(400, "boxes must be JSON: [[x0, y0, x1, y1], ...]") from None
        async with input_file(*s) as path:
            res, mask = await run(engine.segment, path, model or None, bx, tmp=str(path.parent))
        if overlay:
            res["overlay"] = png_b64(mask_rgba(mask))
        res["shape"] = list(mask.shape)
        return res

    @app.post("/v1/explain", tags=["models"])
    async def explain(s: tuple = Depends(src), model: str = Form(""), method: str = Form(""),
                      g: Grant = read) -> dict[str, Any]:
        async with input_file(*s) as path:
            res, sal = await run(engine.explain, path, model or None, method or None, tmp=str(path.parent))
        return res | {"overlay": png_b64(heat_rgba(sal)), "shape": list(sal.shape)}

    @app.post("/v1/ood", tags=["models"])
    async def ood(s: tuple = Depends(src), model: str = Form(""), g: Grant = read) -> dict[str, Any]:
        async with input_file(*s) as path:
            return await run(engine.ood, path, model or None, tmp=str(path.parent))

    @app.post("/v1/zero-shot", tags=["models"])
    async def zero_shot(s: tuple = Depends(src), findings: str = Form(""), model: str = Form(""),
                        g: Grant = read) -> dict[str, Any]:
        names = [f.strip() for f in findings.split(",") if f.strip()] or None
        async with input_file(*s) as path:
            return await run(engine.zero_shot, path, names, model or None, tmp=str(path.parent))

    @app.post("/v1/similar", tags=["models"])
    async def similar(s: tuple = Depends(src), k: int = Form(5), model: str = Form(""),
                      g: Grant = read) -> dict[str, Any]:
        async with input_file(*s) as path:
            return await run(engine.similar, path, max(1, min(k, 50)), model or None, tmp=str(path.parent))

    @app.post("/v1/report", tags=["models"])
    async def report(s: tuple = Depends(src), k: int = Form(5), model: str = Form(""),
                     g: Grant = read) -> dict[str, Any]:
        async with input_file(*s) as path:
            return await run(engine.report, path, max(1, min(k, 50)), model or None, tmp=str(path.parent))

    @app.get("/v1/cases/{case_id}", tags=["models"])
    async def case(case_id: str, g: Grant = read) -> dict[str, Any]:
        return await run(engine.case, case_id)

    @app.get("/v1/cases/{case_id}/image", tags=["models"])
    async def case_image(case_id: str, g: Grant = read) -> Response:
        a = await run(engine.case_image, case_id)
        return Response(_png_grey(a), media_type="image/png")

    # ---- the PACS bridge (the viewer's data) ---------------------------------------------------------
    def pacs() -> Any:
        if cfg.pacs is None:
            raise HttpError(404, "no PACS configured: start the service with --pacs URL")
        return cfg.pacs

    @app.get("/v1/pacs/studies", tags=["pacs"])
    async def studies(g: Grant = read) -> list[dict[str, Any]]:
        return await run(pacs().studies)

    @app.get("/v1/pacs/studies/{study}/instances", tags=["pacs"])
    async def instances(study: str, g: Grant = read) -> list[dict[str, Any]]:
        return await run(pacs().instances, study)

    @app.get("/v1/pacs/studies/{study}/results", tags=["pacs"])
    async def results(study: str, g: Grant = read) -> list[dict[str, Any]]:
        """medfm's SR / SEG / secondary-capture results stored in the study (a QIDO search)."""
        return await run(pacs().find_results, study)

    @app.get("/v1/pacs/image", tags=["pacs"])
    async def image(study: str, series: str, instance: str, g: Grant = read) -> Response:
        """The instance's pixels for window/level in the browser: little-endian float32 (rows x cols),
        with X-Rows / X-Cols and a default window (X-Window-Center / X-Window-Width)."""
        tmp = tempfile.mkdtemp(prefix="medfm-serve-")
        try:
            path = await run(_fetch_instance, study, series, instance, Path(tmp), tmp=tmp)
            a = await run(engine.display, path, tmp=tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        lo, hi = (float(v) for v in np.percentile(a, [1, 99]))
        return Response(np.ascontiguousarray(a, "<f4").tobytes(), media_type="application/octet-stream",
                        headers={"X-Rows": str(a.shape[0]), "X-Cols": str(a.shape[1]),
                                 "X-Window-Center": f"{(lo + hi) / 2:.3f}",
                                 "X-Window-Width": f"{max(hi - lo, 1e-3):.3f}"})

    @app.post("/v1/pacs/analyse", tags=["pacs"])
    async def analyse(request: Request, study: str = Form(...), series: str = Form(...),
                      instance: str = Form(...), store: bool = Form(False)) -> dict[str, Any]:
        """Classify + segment (+ report, + OOD when served) a PACS instance; ``store`` (write scope) puts
        the SR, SEG and overlay back into the study."""
        grant: Grant = request.state.grant
        if "read" not in grant.scopes or (store and "write" not in grant.scopes):
            need_s = "write" if store else "read"
            raise HttpError(403, f"token '{grant.name}' lacks the '{need_s}' scope")
        tmp = tempfile.mkdtemp(prefix="medfm-serve-")
        try:
            path = await run(_fetch_instance, study, series, instance, Path(tmp), tmp=tmp)
            r = await run(engine.analyse, path, tmp=tmp)
            out = await run(_with_extras, path, r, tmp=tmp)
            if store:  # the same analysis, written back as DICOM
                out["stored"] = await run(_store_results, path, r, tmp=tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def _with_extras(path: Path, analysis: dict[str, Any]) -> dict[str, Any]:
        """The analysis as JSON (mask as an overlay) plus saliency, OOD and a report where served."""
        r = dict(analysis)
        mask = r.pop("_mask", None)
        if mask is not None:
            r["overlay"] = png_b64(mask_rgba(mask))
        caps = {c for d in engine.describe() for c in d["capabilities"]}
        if "explain" in caps:
            _, sal = engine.explain(path)
            r["saliency"] = png_b64(heat_rgba(sal))
        if "ood" in caps:
            r["ood"] = {k: v for k, v in engine.ood(path).items() if k not in ("model", "input")}
        if "report" in caps and engine.index is not None:
            r["report"] = {k: v for k, v in engine.report(path).items() if k not in ("input",)}
        return r

    def _store_results(path: Path, analysis: dict[str, Any]) -> dict[str, str]:
        import pydicom

        from medfm.pacs.results import build_results

        ds = pydicom.dcmread(path)
        try:
            out = build_results(engine.instance_result(ds, analysis))
        except (ValueError, TypeError, AttributeError) as e:  # highdicom refusing this source's attributes
            raise InputError(None, f"results could not be encoded as DICOM for this instance ({e})") from None
        cfg.pacs.store(out)
        return {str(d.Modality): str(d.SOPInstanceUID) for d in out}

    @app.get("/v1/pacs/dicom", tags=["pacs"])
    async def download(study: str, series: str, instance: str, identifiers: bool = False,
                       g: Grant = read) -> Response:
        """One instance as a DICOM file (the viewer's "download SR"); patient identifiers removed unless
        ``identifiers=true`` (UIDs stay: they link the result to its source)."""
        from medfm.data.deid import dicom_identifiers

        ds = await run(pacs().retrieve_instance, study, series, instance)
        if not identifiers:
            for kw in dicom_identifiers(ds):
                if not kw.endswith("UID") and kw in ds:
                    delattr(ds, kw)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return Response(buf.getvalue(), media_type="application/dicom",
                        headers={"Content-Disposition": f'attachment; filename="{ds.Modality.lower()}.dcm"'})

    # ---- the viewer ----------------------------------------------------------------------------------
    @app.get("/viewer", tags=["viewer"], include_in_schema=False)
    def viewer(request: Request, token: str = "") -> Response:
        if token:  # log in once: the token moves into an HttpOnly cookie and out of the address bar
            resp = RedirectResponse("/viewer", 303)
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return resp
        return FileResponse(VIEWER / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/viewer/{name}", tags=["viewer"], include_in_schema=False)
    def viewer_asset(name: str) -> Response:
        p = (VIEWER / name).resolve()
        if p.parent != VIEWER.resolve() or not p.is_file():
            raise HttpError(404, "not found")
        return FileResponse(p)

    return app


def _png_grey(a: np.ndarray) -> bytes:
    from PIL import Image

    lo, hi = (float(v) for v in np.percentile(a, [1, 99]))
    u8 = (np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG")
    return buf.getvalue()


def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    return h[7:].strip() if h.lower().startswith("bearer ") else None


def _route_name(app: FastAPI, scope: dict) -> str:
    """The route template (``/v1/cases/{case_id}``), never the concrete path with its ids."""
    from starlette.routing import Match

    for r in app.router.routes:
        if r.matches(scope)[0] == Match.FULL:
            return getattr(r, "path", "other")
    return "other"


class Guard:
    """Authenticates every HTTP request (bearer header, or the viewer's cookie), refuses oversized bodies by
    their Content-Length, and records metrics and one log line (route template, status, time, token name).

    Pure ASGI rather than ``@app.middleware("http")``: the latter wraps each request in extra tasks and
    streams, which stalled under concurrent load with client disconnects."""

    def __init__(self, app: Any, tokens: Tokens, cfg: ServeConfig, metrics: Metrics, route_of: Any) -> None:
        self.app, self.tokens, self.cfg, self.metrics, self.route_of = app, tokens, cfg, metrics, route_of

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, rid = time.perf_counter(), uuid.uuid4().hex[:8]
        request = Request(scope)
        route = self.route_of(scope)
        token = _bearer(request) or request.cookies.get(COOKIE)
        if scope["path"] == "/viewer" and request.query_params.get("token"):
            token = request.query_params["token"]
        grant = self.tokens.check(token)
        status = {"code": 500}

        async def send_status(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = int(msg["status"])
            await send(msg)

        size = request.headers.get("content-length")
        if grant is None:
            await JSONResponse({"detail": "missing or invalid bearer token"}, 401,
                               headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_status)
        elif size is not None and size.isdigit() and int(size) > self.cfg.max_upload_bytes + 65536:
            await JSONResponse({"detail": f"upload larger than {self.cfg.max_upload_bytes} bytes"}, 413)(
                scope, receive, send_status)
        else:
            scope.setdefault("state", {})["grant"] = grant
            self.metrics.in_flight.inc()
            try:
                await self.app(scope, receive, send_status)
            finally:
                self.metrics.in_flight.dec()
        dt = time.perf_counter() - t0
        self.metrics.requests.labels(route, str(status["code"])).inc()
        self.metrics.latency.labels(route).observe(dt)
        log.info("%s %s %s %d %.1fms %s", rid, scope["method"], route, status["code"], dt * 1000,
                 grant.name if grant else "-")
