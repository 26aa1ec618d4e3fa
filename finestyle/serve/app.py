"""`finestyle serve`: a reference HTTP inference server for an export (FastAPI + uvicorn).

- One process per GPU; one inference worker thread shares one session per component.
- A bounded queue: when it is full the answer is 503 with Retry-After, never an OOM crash.
- Dynamic batching: requests with the same shape (steps, guidance, size) are run in one denoising
  loop, up to `max_batch` images, waiting at most `max_wait_ms` for company.
- Every request is validated (prompt tokens, steps, size, images, body size): 4xx with a message.
- Shutdown drains the requests in flight (up to `drain_s`), refusing new ones with 503.
- /metrics: Prometheus text (requests by status, latency histogram, queue depth, batch sizes).
Scaling out = more replicas behind a balancer (README).
"""

import asyncio
import base64
import dataclasses
import secrets
import time
from typing import Any

from finestyle.artifacts.manifest import export_native_size, verify_export
from finestyle.config import ServeConfig
from finestyle.core.env import check_port_free
from finestyle.runtime.generate import (
    Backend,
    GenerationRequest,
    provenance,
)
from finestyle.serve.batcher import Batcher, Job, encode_pngs, style_of, submit_request
from finestyle.serve.lifecycle import (
    drain_then_exit,
    make_lifespan,
    reload_styles,
    shape_compiles,
)
from finestyle.serve.metrics import LATENCY_BUCKETS, Metrics
from finestyle.serve.openai import add_openai_routes, images_model, openai_error
from finestyle.serve.requests import (
    describe_model,
    models_list,
    request_fields,
    request_model,
    request_problem,
    to_request,
    warn_headers,
)


def _add_admin(app: Any, state: dict[str, Any]) -> None:
    """POST /v1/admin/reload (only with FINESTYLE_ADMIN_TOKEN set, which it requires as a bearer token)."""
    import os

    from fastapi import Request
    from fastapi.responses import JSONResponse

    token = os.environ.get("FINESTYLE_ADMIN_TOKEN")
    if not token:
        return

    @app.post("/v1/admin/reload")
    async def reload_ep(request: Request):
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return JSONResponse(
                {"detail": "admin token required (Authorization: Bearer ...)"}, status_code=401
            )
        return await reload_styles(state)


def _add_guards(app: Any, cfg: ServeConfig) -> None:
    """Body-size limit (413) before parsing, and one JSON shape for internal errors (500)."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        if request.method == "POST":
            cl = request.headers.get("content-length")
            if cl is not None and cl.isdigit() and int(cl) > cfg.max_body_bytes:
                return JSONResponse(
                    {"detail": f"request body is {cl} bytes; the limit is {cfg.max_body_bytes}"},
                    status_code=413,
                )
            body = await request.body()
            if len(body) > cfg.max_body_bytes:
                return JSONResponse(
                    {"detail": f"request body exceeds {cfg.max_body_bytes} bytes"}, status_code=413
                )
        return await call_next(request)

    from fastapi.exception_handlers import request_validation_exception_handler
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        if request.url.path == "/v1/images/generations":
            err = exc.errors()[0] if exc.errors() else {}
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            return openai_error(
                400,
                f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}",
                param=".".join(loc) or None,
                code="invalid_value",
            )
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


def metrics_text(state: dict[str, Any], metrics: Metrics) -> bytes:
    """/metrics: the registry's exposition with the live gauges (queue, in flight, compiles, runtime)."""
    b: Batcher | None = state.get("batcher")
    be = state.get("backend")
    return metrics.render(
        b.depth() if b else 0, state["in_flight"], shape_compiles(be), getattr(be, "name", "")
    )


def create_app(cfg: ServeConfig, backend: Backend | None = None) -> Any:
    """Build the FastAPI app. `backend` may be given (tests); otherwise the export is loaded at start-up."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    state: dict[str, Any] = {"ready": False, "draining": False, "in_flight": 0}
    metrics = Metrics()
    if cfg.max_size is None:  # the size limit follows the model: twice its native size
        native = backend.native_size * backend.vae_scale if backend else export_native_size(cfg.export)
        cfg = dataclasses.replace(cfg, max_size=2 * native if native else 1024)

    GenerateBody = request_model(cfg)

    app = FastAPI(title="FineStyle inference", lifespan=make_lifespan(cfg, backend, state, metrics))

    _add_guards(app, cfg)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        be = state.get("backend")
        return {"status": "ok", "runtime": be.name} if be is not None else {"status": "ok"}

    @app.get("/readyz")
    @app.get("/health/ready")
    async def readyz():
        """Readiness: 503 while loading and from the moment a drain starts (SIGTERM)."""
        if state["ready"] and not state["draining"]:
            return {"status": "ready"}
        return JSONResponse({"status": "draining" if state["draining"] else "loading"}, status_code=503)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        """Liveness: 200 for as long as the process serves, draining included."""
        return {"status": "draining" if state["draining"] else "ok"}

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        return describe_model(state["backend"], cfg)

    @app.get("/metrics")
    async def prom() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics_text(state, metrics), media_type=CONTENT_TYPE_LATEST)

    async def submit(req: GenerationRequest) -> tuple[int, Any]:
        return await submit_request(state, cfg, req)

    def not_ready() -> bool:
        return state["draining"] or not state["ready"]

    @app.post("/v1/generate")
    async def generate_ep(body: GenerateBody):
        t0 = time.perf_counter()
        if not_ready():
            metrics.observe(503, None)
            return JSONResponse(
                {"detail": "server is not ready or is shutting down"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        be: Backend = state["backend"]
        problem = request_problem(body, be, cfg)
        if problem:
            metrics.observe(problem[0], None)
            detail: Any = problem[1]
            if problem[0] == 404 and be.kv is not None:
                detail = {"message": problem[1], "styles": be.styles}
            return JSONResponse({"detail": detail}, status_code=problem[0])
        req = to_request(body)
        warn = warn_headers(be, req)
        status, result = await submit(req)
        if status != 200:
            metrics.observe(status, None, style_of(be, req))
            headers = {"Retry-After": "1"} if status == 503 else None
            return JSONResponse({"detail": result}, status_code=status, headers=headers)
        # PNG encoding takes tens of ms at 512 px: off the event loop, which keeps serving
        pngs = await asyncio.to_thread(encode_pngs, result, provenance(req, be))
        metrics.observe(200, time.perf_counter() - t0, style_of(be, req))
        if body.response_format == "png" and len(pngs) == 1:
            return Response(pngs[0], media_type="image/png", headers={"X-Seed": str(req.seed), **warn})
        body_out = {
            "images": [base64.b64encode(p).decode() for p in pngs],
            "seed": req.seed,
            "seconds": time.perf_counter() - t0,
        }
        return JSONResponse(body_out, headers=warn) if warn else body_out

    add_openai_routes(app, state, cfg, metrics)
    _add_admin(app, state)

    app.state.finestyle = state
    app.state.metrics = metrics
    return app


def run_config(cfg: ServeConfig) -> None:
    """Start uvicorn for a complete ServeConfig (what `finestyle serve` builds from flags and YAML)."""
    import uvicorn

    if cfg.export.startswith("models:/"):  # a registered MLflow version (`export --register mlflow`)
        from finestyle.export.registry import resolve_model_uri

        cfg = dataclasses.replace(cfg, export=resolve_model_uri(cfg.export))
    verify_export(cfg.export)  # fail fast, before binding, with the manifest's message
    check_port_free(cfg.host, cfg.port)  # before loading the model: a busy port is one line, exit 2
    app = create_app(cfg)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level="info",
            timeout_graceful_shutdown=int(cfg.drain_s) + 5,
        )
    )
    app.state.finestyle["server"] = server  # SIGTERM's drain stops it (`drain_then_exit`)
    server.run()


__all__ = [
    "Batcher",
    "Job",
    "LATENCY_BUCKETS",
    "Metrics",
    "_add_admin",
    "_add_guards",
    "add_openai_routes",
    "encode_pngs",
    "make_lifespan",
    "describe_model",
    "request_problem",
    "submit_request",
    "to_request",
    "check_port_free",
    "create_app",
    "drain_then_exit",
    "images_model",
    "models_list",
    "openai_error",
    "reload_styles",
    "request_fields",
    "request_model",
    "run_config",
    "style_of",
]
