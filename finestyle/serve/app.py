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

# No `from __future__ import annotations` here: FastAPI must resolve the request model, which is
# built inside create_app from the configured limits.

import asyncio
import base64
import dataclasses
import io
import secrets
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from finestyle.artifacts.manifest import export_native_size, verify_export
from finestyle.config import EMPTY_PROMPT, ServeConfig
from finestyle.core.errors import UserError
from finestyle.runtime.generate import (
    SCHEDULERS,
    Backend,
    GenerationRequest,
    generate_batch,
    load_backend,
    negative_with_exclusions,
    provenance,
    shape_key,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, float("inf"))


class Metrics:
    """Prometheus metrics in a registry of this app's own (prometheus_client's exposition format and
    histogram semantics); several apps in one process never share counters."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "finestyle_requests",
            "Requests to the generation endpoints by HTTP status.",
            ["status"],
            registry=r,
        )
        self.latency = Histogram(
            "finestyle_request_seconds",
            "Latency of successful generation requests.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.style_requests = Counter(
            "finestyle_style_requests",
            "Generation requests by style and HTTP status.",
            ["style", "status"],
            registry=r,
        )
        self.style_images = Counter(
            "finestyle_style_images", "Images generated, by style.", ["style"], registry=r
        )
        self.batch_sizes = Counter(
            "finestyle_batch_size", "Denoising loops run, by images in the batch.", ["size"], registry=r
        )
        self.images = Counter("finestyle_images", "Images generated.", registry=r)
        self.queue_depth = Gauge(
            "finestyle_queue_depth", "Requests waiting for the inference worker.", registry=r
        )
        self.in_flight = Gauge("finestyle_in_flight", "Requests accepted and not yet answered.", registry=r)

    def observe(self, status: int, seconds: float | None, style: str | None = None) -> None:
        self.requests.labels(status=str(status)).inc()
        if style is not None:
            self.style_requests.labels(style=style, status=str(status)).inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def batch(self, reqs: list[GenerationRequest], styles: list[str | None]) -> None:
        n = sum(r.num_images for r in reqs)
        self.batch_sizes.labels(size=str(n)).inc()
        self.images.inc(n)
        for r, st in zip(reqs, styles, strict=True):
            if st is not None:
                self.style_images.labels(style=st).inc(r.num_images)

    def render(self, queue_depth: int, in_flight: int) -> bytes:
        from prometheus_client import generate_latest

        self.queue_depth.set(queue_depth)
        self.in_flight.set(in_flight)
        return generate_latest(self.registry)


@dataclass
class Job:
    req: GenerationRequest
    future: asyncio.Future
    enqueued: float


class Batcher:
    """Pulls jobs from the queue, groups same-shape jobs, runs them in a worker thread."""

    def __init__(self, backend: Backend, cfg: ServeConfig, metrics: Metrics) -> None:
        self.backend, self.cfg, self.metrics = backend, cfg, metrics
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=cfg.queue_size)
        self.pending: list[Job] = []  # taken from the queue but not matching the current batch
        self.busy = False
        self.last_batch = 1
        self.task: asyncio.Task | None = None

    def depth(self) -> int:
        return self.queue.qsize() + len(self.pending)

    def _take_nowait(self) -> Job | None:
        if self.pending:
            return self.pending.pop(0)
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def _next(self, timeout: float | None) -> Job | None:
        if self.pending:
            return self.pending.pop(0)
        try:
            if timeout is None:
                return await self.queue.get()
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            if first is None:
                continue
            batch = [first]
            n = first.req.num_images
            key = shape_key(first.req)
            if self.cfg.batching:
                # Wait for company only when there is concurrency (the last loop was a batch, or
                # requests are queued): a lone client then pays no batching latency.
                # The wait ends at max_wait_ms, or earlier once the burst is over: no arrival for
                # max_gap_ms (closed-loop clients re-send within a few ms of their answers, so
                # waiting on for a batch that cannot fill only adds latency).
                wait_s = self.cfg.max_wait_ms / 1000 if (self.last_batch > 1 or self.depth() > 0) else 0.0
                deadline = loop.time() + wait_s
                gap_s = self.cfg.max_gap_ms / 1000
                held: list[Job] = []
                while n < self.cfg.max_batch:
                    nxt = self._take_nowait()
                    if nxt is None:
                        left = min(deadline - loop.time(), gap_s)
                        if left <= 0:
                            break
                        nxt = await self._next(left)
                        if nxt is None:
                            break
                    if shape_key(nxt.req) == key and n + nxt.req.num_images <= self.cfg.max_batch:
                        batch.append(nxt)
                        n += nxt.req.num_images
                    else:
                        held.append(nxt)
                self.pending = held + self.pending
            self.last_batch = len(batch)
            batch = [j for j in batch if not j.future.done()]  # timed-out clients
            if not batch:
                continue
            self.busy = True
            try:
                results = await loop.run_in_executor(
                    None, generate_batch, self.backend, [j.req for j in batch]
                )
                self.metrics.batch([j.req for j in batch], [style_of(self.backend, j.req) for j in batch])
                for j, imgs in zip(batch, results, strict=True):
                    if not j.future.done():
                        j.future.set_result(imgs)
            except Exception as exc:  # noqa: BLE001 - answer every waiting request
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
            finally:
                self.busy = False


def style_of(be: Backend | None, req: GenerationRequest) -> str | None:
    """The style a request runs in (a swappable export's name), for the per-style metrics."""
    if be is None or be.kv is None:
        return None
    return req.style or be.default_style


def _encode_pngs(images: list[Any], meta: dict[str, str]) -> list[bytes]:
    """PNG bytes with the provenance text chunks."""
    from PIL.PngImagePlugin import PngInfo

    out = []
    for im in images:
        info = PngInfo()
        for k, v in meta.items():
            info.add_itxt(k, v)
        buf = io.BytesIO()
        im.save(buf, format="PNG", pnginfo=info)
        out.append(buf.getvalue())
    return out


def _known_scheduler(cls: Any, v: str | None) -> str | None:
    """A request's `scheduler` field: a SCHEDULERS name or None (both request bodies)."""
    if v is not None and v not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {v!r}; use one of: {', '.join(SCHEDULERS)}")
    return v


def request_fields(cfg: ServeConfig, omit: tuple[str, ...] = ()) -> dict[str, Any]:
    """Pydantic fields for config.RequestOptions: its types, defaults and docs, with the server's limits
    as bounds. An omitted seed is None here: the server draws a fresh one and echoes it back."""
    import dataclasses
    from typing import get_type_hints

    from pydantic import Field

    from finestyle.config import RequestOptions, field_docs

    bounds: dict[str, dict[str, Any]] = {
        "steps": dict(ge=cfg.min_steps, le=cfg.max_steps),
        "guidance": dict(ge=0, le=50),
        "style_guidance": dict(ge=0, le=50),
        "width": dict(ge=8, le=cfg.max_size),
        "height": dict(ge=8, le=cfg.max_size),
        "seed": dict(ge=0, le=2**63 - 1),
        "num_images": dict(ge=1, le=cfg.max_images),
        "style": dict(max_length=64),
    }
    hints, docs = get_type_hints(RequestOptions), field_docs(RequestOptions)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(RequestOptions):
        if f.name in omit:
            continue
        tp, default = hints[f.name], f.default
        if f.name == "prompt":
            default = ...
        elif f.name == "seed":
            tp, default = int | None, None
        out[f.name] = (
            tp,
            Field(default, description=" ".join(docs[f.name].split()), **bounds.get(f.name, {})),
        )
    return out


def _multiple_of_8(cls: Any, v: int | None) -> int | None:
    if v is not None and v % 8:
        raise ValueError(f"must be a multiple of 8 (got {v})")
    return v


def request_model(cfg: ServeConfig) -> Any:
    """The pydantic model of POST /v1/generate: the request options, plus the response format."""
    from pydantic import ConfigDict, Field, create_model, field_validator

    return create_model(
        "GenerateBody",
        __config__=ConfigDict(extra="forbid"),
        __validators__={
            "known_scheduler": field_validator("scheduler")(classmethod(_known_scheduler)),
            "multiple_of_8": field_validator("width", "height")(classmethod(_multiple_of_8)),
        },
        response_format=(str, Field("png", pattern="^(png|json)$")),
        **request_fields(cfg),
    )


def _model_info(be: Backend, cfg: ServeConfig) -> dict[str, Any]:
    m = be.manifest
    styles = (m.get("swappable") or {}).get("styles") or {}
    default = styles.get(be.default_style or "", {}) if styles else m
    return {
        "runtime": be.name,
        "base_model": m.get("base_model"),
        "style": default.get("style"),
        "concepts": default.get("concepts", []),  # a swappable export's: its default style's
        "style_concepts": {n: v.get("concepts", []) for n, v in styles.items()} or None,
        "lora_scale": m.get("lora_scale"),
        "precision": m.get("precision"),
        "style_guidance": be.unet_base is not None or be.kv is not None,
        "styles": be.styles or None,
        "manifest_sha256": be.manifest_sha256,
        "native_size": be.native_size * be.vae_scale,
        "limits": {
            "max_steps": cfg.max_steps,
            "max_size": cfg.max_size,
            "max_images": cfg.max_images,
            "max_prompt_tokens": cfg.max_prompt_tokens,
        },
    }


def _request_problem(body: Any, be: Backend, cfg: ServeConfig) -> tuple[int, str] | None:
    """What makes a schema-valid request unservable by this backend ((status, message)), or None."""
    if not body.prompt.strip():
        return 422, EMPTY_PROMPT
    for name in ("prompt", "negative_prompt"):
        n_tok = len(be.tokenizer(getattr(body, name)).input_ids)
        if n_tok > cfg.max_prompt_tokens:
            return 422, f"{name} is {n_tok} tokens; the limit is {cfg.max_prompt_tokens}"
    style = getattr(body, "style", None)
    if be.kv is None and style:
        return (
            404,
            f"unknown style {style!r}: this export serves one style (use {_plain_id(be)!r} or omit it)",
        )
    if be.kv is not None and style and style not in be.styles:
        return 404, f"unknown style {style!r}; this server has: {', '.join(be.styles)}"
    if body.style_guidance > 0 and be.unet_base is None and be.kv is None:
        return 422, "style_guidance needs an export made with --with-base-unet"
    return None


def _plain_id(be: Backend) -> str:
    from finestyle.artifacts.styles import style_slug

    return style_slug(be.manifest.get("style") or "model")


def _to_request(body: Any) -> GenerationRequest:
    """The runtime's request from a validated body; an omitted seed becomes a fresh random one."""
    values = {f.name: getattr(body, f.name) for f in dataclasses.fields(GenerationRequest)}
    if values["seed"] is None:
        values["seed"] = secrets.randbelow(2**32)
    return GenerationRequest(**values)


def _wxh(cfg: ServeConfig) -> Any:
    def wxh(cls: Any, v: str | None) -> str | None:
        if v is None or v == "auto":
            return None
        parts = v.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"size must be WIDTHxHEIGHT, e.g. 512x512 (got {v!r})")
        w, h = map(int, parts)
        if not (8 <= w <= cfg.max_size and 8 <= h <= cfg.max_size) or w % 8 or h % 8:
            raise ValueError(f"size {v}: each side a multiple of 8, at most {cfg.max_size}")
        return v

    return wxh


def images_model(cfg: ServeConfig) -> Any:
    """POST /v1/images/generations: OpenAI's fields, plus FineStyle's request options as extra body
    fields (OpenAI's `n`, `size` and `model` stand for num_images, width x height and style)."""
    from pydantic import ConfigDict, Field, create_model, field_validator

    n = request_fields(cfg)["num_images"]
    return create_model(
        "ImagesBody",
        __config__=ConfigDict(extra="forbid"),
        __validators__={
            "wxh": field_validator("size")(classmethod(_wxh(cfg))),
            "known_scheduler": field_validator("scheduler")(classmethod(_known_scheduler)),
        },
        model=(str | None, Field(None, max_length=64, description="the style (GET /v1/models)")),
        n=n,
        size=(str | None, Field(None, description="WIDTHxHEIGHT, multiples of 8 (default: the model's)")),
        response_format=(str, Field("b64_json", pattern="^b64_json$", description="only b64_json")),
        output_format=(str | None, Field(None, pattern="^png$")),
        quality=(str | None, Field(None, description="accepted and ignored: steps set the quality")),
        user=(str | None, Field(None, max_length=256)),
        exclude_concepts=(list[str], Field(default_factory=list, max_length=32)),
        **request_fields(cfg, omit=("num_images", "width", "height", "style")),
    )


def _images_view(body: Any, style: str | None) -> Any:
    """The fields `_request_problem` reads, from an OpenAI body."""
    from types import SimpleNamespace

    neg = negative_with_exclusions(body.negative_prompt, body.exclude_concepts)
    return SimpleNamespace(
        prompt=body.prompt, negative_prompt=neg, style=style, style_guidance=body.style_guidance
    )


def _images_request(body: Any, style: str | None) -> GenerationRequest:
    w, h = map(int, body.size.lower().split("x")) if body.size else (None, None)
    values = {f.name: getattr(body, f.name, None) for f in dataclasses.fields(GenerationRequest)}
    values.update(
        negative_prompt=negative_with_exclusions(body.negative_prompt, body.exclude_concepts),
        width=w,
        height=h,
        num_images=body.n,
        style=style,
    )
    if values["seed"] is None:
        values["seed"] = secrets.randbelow(2**32)
    return GenerationRequest(**values)


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> Any:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status_code=status,
        headers=headers,
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


async def reload_styles(state: dict[str, Any]) -> Any:
    """Re-read a swappable export's styles without a restart (admin endpoint and SIGHUP)."""
    from fastapi.responses import JSONResponse

    be: Backend = state["backend"]
    if be.reload is None:
        return JSONResponse({"detail": "this export is not swappable: nothing to reload"}, status_code=409)
    try:
        styles = await asyncio.to_thread(be.reload)
    except UserError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=409)
    return {"styles": styles}


def models_list(be: Backend) -> dict[str, Any]:
    """GET /v1/models in OpenAI's list shape: one entry per style (a plain export: its one style)."""
    m = be.manifest
    created = int(m.get("created", 0))
    if be.kv is None:
        entries = [(_plain_id(be), m.get("style"), m.get("concepts", []))]
    else:
        styles = m["swappable"]["styles"]
        entries = [("base", None, [])] + [
            (n, styles[n].get("style"), styles[n].get("concepts", [])) for n in be.styles if n != "base"
        ]
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "finestyle",
                "style": text,
                "concepts": c,
            }
            for name, text, c in entries
        ],
    }


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


def _lifespan(cfg: ServeConfig, backend: Backend | None, state: dict[str, Any], metrics: Metrics) -> Any:
    """Start-up (load the export, start the batcher) and shutdown (drain, then stop the worker)."""

    @asynccontextmanager
    async def lifespan(app: Any):
        be = backend or await asyncio.get_running_loop().run_in_executor(
            None, lambda: load_backend(cfg.export, cfg.runtime, cfg.providers, dtype=cfg.dtype)
        )
        state["backend"] = be
        state["batcher"] = Batcher(be, cfg, metrics)
        state["batcher"].task = asyncio.create_task(state["batcher"].run())
        _on_sighup(state)
        _on_sigterm(state, cfg)
        state["ready"] = True
        try:
            yield
        finally:
            # drain: refuse new work, let accepted requests finish (bounded), then stop the worker
            state["draining"] = True
            state["ready"] = False
            t_end = time.monotonic() + cfg.drain_s
            while state["in_flight"] and time.monotonic() < t_end:
                await asyncio.sleep(0.05)
            state["batcher"].task.cancel()

    return lifespan


async def _submit(state: dict[str, Any], cfg: ServeConfig, req: GenerationRequest) -> tuple[int, Any]:
    """Queue a request and wait: (200, images) or (status, message)."""
    batcher: Batcher = state["batcher"]
    fut = asyncio.get_running_loop().create_future()
    try:
        batcher.queue.put_nowait(Job(req, fut, time.monotonic()))
    except asyncio.QueueFull:
        return 503, f"queue full ({cfg.queue_size} waiting); retry later"
    state["in_flight"] += 1
    try:
        return 200, await asyncio.wait_for(fut, cfg.timeout_s)
    except asyncio.TimeoutError:
        return 504, f"timed out after {cfg.timeout_s:g} s"
    finally:
        state["in_flight"] -= 1


def _add_openai_routes(app: Any, state: dict[str, Any], cfg: ServeConfig, metrics: Metrics) -> None:
    """GET /v1/models and POST /v1/images/generations (OpenAI's shapes; `model` is the style)."""
    ImagesBody = images_model(cfg)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return models_list(state["backend"])

    @app.post("/v1/images/generations")
    async def images_ep(body: ImagesBody):
        t0 = time.perf_counter()
        if state["draining"] or not state["ready"]:
            metrics.observe(503, None)
            return openai_error(503, "server is not ready or is shutting down", code="unavailable")
        be: Backend = state["backend"]
        plain_id = _plain_id(be)
        style = body.model if be.kv is not None else (None if body.model in (None, plain_id) else body.model)
        problem = _request_problem(_images_view(body, style), be, cfg)
        if problem:
            metrics.observe(problem[0], None)
            code = "model_not_found" if problem[0] == 404 else "invalid_value"
            return openai_error(
                problem[0], problem[1], param="model" if problem[0] == 404 else None, code=code
            )
        req = _images_request(body, style)
        status, result = await _submit(state, cfg, req)
        if status != 200:
            metrics.observe(status, None, style_of(be, req))
            return openai_error(status, result, code="overloaded" if status == 503 else "timeout")
        pngs = await asyncio.to_thread(_encode_pngs, result, provenance(req, be))
        metrics.observe(200, time.perf_counter() - t0, style_of(be, req))
        return {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(p).decode()} for p in pngs],
        }


def _on_sighup(state: dict[str, Any]) -> None:
    """SIGHUP re-reads a swappable export's styles (where the loop runs in the main thread)."""
    import signal
    import sys

    if state["backend"].reload is None or not hasattr(signal, "SIGHUP"):
        return

    def hup() -> None:
        async def go() -> None:
            res = await reload_styles(state)
            msg = res.body.decode() if hasattr(res, "body") else f"styles {', '.join(res['styles'])}"
            print(f"serve: SIGHUP reload: {msg}", file=sys.stderr, flush=True)

        asyncio.ensure_future(go())

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, hup)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (e.g. embedded)
        pass


async def drain_then_exit(state: dict[str, Any], cfg: ServeConfig) -> None:
    """SIGTERM: turn not-ready at once (new requests get 503 with Retry-After), let the accepted ones
    finish for up to `drain_s`, then stop the server, which exits 0."""
    import signal

    if state.get("terminating"):
        return
    state.update(terminating=True, draining=True, ready=False)
    print(
        f"serve: SIGTERM: not ready; draining {state['in_flight']} request(s) in flight (up to {cfg.drain_s:g} s)",
        file=sys.stderr,
        flush=True,
    )
    t_end = time.monotonic() + cfg.drain_s
    while state["in_flight"] and time.monotonic() < t_end:
        await asyncio.sleep(0.05)
    server = state.get("server")
    if server is not None:
        server.should_exit = True
    else:  # run by another launcher: hand it the usual graceful stop
        signal.raise_signal(signal.SIGINT)


def _on_sigterm(state: dict[str, Any], cfg: ServeConfig) -> None:
    """Take SIGTERM over from uvicorn (which would stop listening first and exit 143): drain, exit 0."""
    import signal

    try:
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, lambda: asyncio.ensure_future(drain_then_exit(state, cfg))
        )
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (e.g. embedded)
        pass


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

    app = FastAPI(title="FineStyle inference", lifespan=_lifespan(cfg, backend, state, metrics))

    _add_guards(app, cfg)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

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
        return _model_info(state["backend"], cfg)

    @app.get("/metrics")
    async def prom() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        b: Batcher | None = state.get("batcher")
        return Response(
            metrics.render(b.depth() if b else 0, state["in_flight"]), media_type=CONTENT_TYPE_LATEST
        )

    async def submit(req: GenerationRequest) -> tuple[int, Any]:
        return await _submit(state, cfg, req)

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
        problem = _request_problem(body, be, cfg)
        if problem:
            metrics.observe(problem[0], None)
            detail: Any = problem[1]
            if problem[0] == 404 and be.kv is not None:
                detail = {"message": problem[1], "styles": be.styles}
            return JSONResponse({"detail": detail}, status_code=problem[0])
        req = _to_request(body)
        status, result = await submit(req)
        if status != 200:
            metrics.observe(status, None, style_of(be, req))
            headers = {"Retry-After": "1"} if status == 503 else None
            return JSONResponse({"detail": result}, status_code=status, headers=headers)
        # PNG encoding takes tens of ms at 512 px: off the event loop, which keeps serving
        pngs = await asyncio.to_thread(_encode_pngs, result, provenance(req, be))
        metrics.observe(200, time.perf_counter() - t0, style_of(be, req))
        if body.response_format == "png" and len(pngs) == 1:
            return Response(pngs[0], media_type="image/png", headers={"X-Seed": str(req.seed)})
        return {
            "images": [base64.b64encode(p).decode() for p in pngs],
            "seed": req.seed,
            "seconds": time.perf_counter() - t0,
        }

    _add_openai_routes(app, state, cfg, metrics)
    _add_admin(app, state)

    app.state.finestyle = state
    app.state.metrics = metrics
    return app


def check_port_free(host: str, port: int) -> None:
    """A UserError naming the address when nothing can listen on it (as uvicorn would bind it)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); stop what uses that port or "
                "pass another --port"
            ) from None


def run_config(cfg: ServeConfig) -> None:
    """Start uvicorn for a complete ServeConfig (what `finestyle serve` builds from flags and YAML)."""
    import uvicorn

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
