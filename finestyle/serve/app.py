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
import io
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from finestyle.artifacts.manifest import verify_export
from finestyle.config import ServeConfig
from finestyle.runtime.generate import (
    SCHEDULERS,
    Backend,
    GenerationRequest,
    generate_batch,
    load_backend,
    provenance,
    shape_key,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, float("inf"))


@dataclass
class Metrics:
    requests: dict[str, int] = field(default_factory=dict)  # by HTTP status
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0
    latency_n: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    images: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, status: int, seconds: float | None) -> None:
        with self.lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1
            if seconds is not None:
                self.latency_sum += seconds
                self.latency_n += 1
                for i, b in enumerate(LATENCY_BUCKETS):
                    if seconds <= b:
                        self.latency_counts[i] += 1

    def batch(self, n: int) -> None:
        with self.lock:
            self.batch_sizes[n] = self.batch_sizes.get(n, 0) + 1
            self.images += n

    def render(self, queue_depth: int, in_flight: int) -> str:
        with self.lock:
            lines = [
                "# HELP finestyle_requests_total Requests to /v1/generate by HTTP status.",
                "# TYPE finestyle_requests_total counter",
            ]
            lines += [
                f'finestyle_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP finestyle_request_seconds Latency of successful /v1/generate requests.",
                "# TYPE finestyle_request_seconds histogram",
            ]
            # counts are cumulative: an observation increments every bucket whose bound it is under
            for b, c in zip(LATENCY_BUCKETS, self.latency_counts, strict=True):
                le = "+Inf" if b == float("inf") else f"{b:g}"
                lines.append(f'finestyle_request_seconds_bucket{{le="{le}"}} {c}')
            lines += [
                f"finestyle_request_seconds_sum {self.latency_sum:.6f}",
                f"finestyle_request_seconds_count {self.latency_n}",
                "# HELP finestyle_queue_depth Requests waiting for the inference worker.",
                "# TYPE finestyle_queue_depth gauge",
                f"finestyle_queue_depth {queue_depth}",
                "# HELP finestyle_in_flight Requests accepted and not yet answered.",
                "# TYPE finestyle_in_flight gauge",
                f"finestyle_in_flight {in_flight}",
                "# HELP finestyle_batch_size_total Denoising loops run, by images in the batch.",
                "# TYPE finestyle_batch_size_total counter",
            ]
            lines += [
                f'finestyle_batch_size_total{{size="{k}"}} {v}' for k, v in sorted(self.batch_sizes.items())
            ]
            lines += [
                "# HELP finestyle_images_total Images generated.",
                "# TYPE finestyle_images_total counter",
                f"finestyle_images_total {self.images}",
            ]
        return "\n".join(lines) + "\n"


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
                self.metrics.batch(sum(j.req.num_images for j in batch))
                for j, imgs in zip(batch, results, strict=True):
                    if not j.future.done():
                        j.future.set_result(imgs)
            except Exception as exc:  # noqa: BLE001 - answer every waiting request
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
            finally:
                self.busy = False


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


def request_model(cfg: ServeConfig) -> Any:
    """The pydantic model of POST /v1/generate, with the server's limits as field bounds."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class GenerateBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str = Field(min_length=1)
        negative_prompt: str = ""
        steps: int = Field(20, ge=cfg.min_steps, le=cfg.max_steps)
        guidance: float = Field(7.5, ge=0, le=50)
        style_guidance: float = Field(0.0, ge=0, le=50)
        width: int | None = Field(None, ge=8, le=cfg.max_size)
        height: int | None = Field(None, ge=8, le=cfg.max_size)
        seed: int | None = Field(None, ge=0, le=2**63 - 1)  # omitted: a fresh random seed, echoed back
        num_images: int = Field(1, ge=1, le=cfg.max_images)
        response_format: str = Field("png", pattern="^(png|json)$")
        scheduler: str | None = Field(None, description="one of " + ", ".join(SCHEDULERS))

        @field_validator("scheduler")
        @classmethod
        def known_scheduler(cls, v: str | None) -> str | None:
            if v is not None and v not in SCHEDULERS:
                raise ValueError(f"unknown scheduler {v!r}; use one of: {', '.join(SCHEDULERS)}")
            return v

        @field_validator("width", "height")
        @classmethod
        def multiple_of_8(cls, v: int | None) -> int | None:
            if v is not None and v % 8:
                raise ValueError(f"must be a multiple of 8 (got {v})")
            return v

    return GenerateBody


def _model_info(be: Backend, cfg: ServeConfig) -> dict[str, Any]:
    m = be.manifest
    return {
        "runtime": be.name,
        "base_model": m.get("base_model"),
        "style": m.get("style"),
        "concepts": m.get("concepts", []),
        "lora_scale": m.get("lora_scale"),
        "precision": m.get("precision"),
        "style_guidance": be.unet_base is not None,
        "manifest_sha256": be.manifest_sha256,
        "native_size": be.native_size * be.vae_scale,
        "limits": {
            "max_steps": cfg.max_steps,
            "max_size": cfg.max_size,
            "max_images": cfg.max_images,
            "max_prompt_tokens": cfg.max_prompt_tokens,
        },
    }


def _request_problem(body: Any, be: Backend, cfg: ServeConfig) -> str | None:
    """What makes a schema-valid request unservable by this backend (422), or None."""
    for name in ("prompt", "negative_prompt"):
        n_tok = len(be.tokenizer(getattr(body, name)).input_ids)
        if n_tok > cfg.max_prompt_tokens:
            return f"{name} is {n_tok} tokens; the limit is {cfg.max_prompt_tokens}"
    if body.style_guidance > 0 and be.unet_base is None:
        return "style_guidance needs an export made with --with-base-unet"
    return None


def _to_request(body: Any) -> GenerationRequest:
    """The runtime's request from a validated body; an omitted seed becomes a fresh random one."""
    return GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.steps,
        guidance=body.guidance,
        style_guidance=body.style_guidance,
        width=body.width,
        height=body.height,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
        num_images=body.num_images,
        scheduler=body.scheduler,
    )


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


def create_app(cfg: ServeConfig, backend: Backend | None = None) -> Any:
    """Build the FastAPI app. `backend` may be given (tests); otherwise the export is loaded at start-up."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, Response

    state: dict[str, Any] = {"ready": False, "draining": False, "in_flight": 0}
    metrics = Metrics()

    GenerateBody = request_model(cfg)

    app = FastAPI(title="FineStyle inference", lifespan=_lifespan(cfg, backend, state, metrics))

    _add_guards(app, cfg)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if state["ready"] and not state["draining"]:
            return {"status": "ready"}
        return JSONResponse({"status": "draining" if state["draining"] else "loading"}, status_code=503)

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        return _model_info(state["backend"], cfg)

    @app.get("/metrics")
    async def prom() -> PlainTextResponse:
        b: Batcher | None = state.get("batcher")
        return PlainTextResponse(
            metrics.render(b.depth() if b else 0, state["in_flight"]), media_type="text/plain; version=0.0.4"
        )

    @app.post("/v1/generate")
    async def generate_ep(body: GenerateBody):
        t0 = time.perf_counter()
        if state["draining"] or not state["ready"]:
            metrics.observe(503, None)
            return JSONResponse(
                {"detail": "server is not ready or is shutting down"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        be: Backend = state["backend"]
        problem = _request_problem(body, be, cfg)
        if problem:
            metrics.observe(422, None)
            return JSONResponse({"detail": problem}, status_code=422)
        req = _to_request(body)
        batcher: Batcher = state["batcher"]
        fut = asyncio.get_running_loop().create_future()
        try:
            batcher.queue.put_nowait(Job(req, fut, time.monotonic()))
        except asyncio.QueueFull:
            metrics.observe(503, None)
            return JSONResponse(
                {"detail": f"queue full ({cfg.queue_size} waiting); retry later"},
                status_code=503,
                headers={"Retry-After": "1"},
            )
        state["in_flight"] += 1
        try:
            images = await asyncio.wait_for(fut, cfg.timeout_s)
        except asyncio.TimeoutError:
            metrics.observe(504, None)
            return JSONResponse({"detail": f"timed out after {cfg.timeout_s:g} s"}, status_code=504)
        finally:
            state["in_flight"] -= 1
        # PNG encoding takes tens of ms at 512 px: off the event loop, which keeps serving
        pngs = await asyncio.to_thread(_encode_pngs, images, provenance(req, be))
        metrics.observe(200, time.perf_counter() - t0)
        if body.response_format == "png" and len(pngs) == 1:
            return Response(pngs[0], media_type="image/png", headers={"X-Seed": str(req.seed)})
        return {
            "images": [base64.b64encode(p).decode() for p in pngs],
            "seed": req.seed,
            "seconds": time.perf_counter() - t0,
        }

    app.state.finestyle = state
    app.state.metrics = metrics
    return app


def run_config(cfg: ServeConfig) -> None:
    """Start uvicorn for a complete ServeConfig (what `finestyle serve` builds from flags and YAML)."""
    import uvicorn

    verify_export(cfg.export)  # fail fast, before binding, with the manifest's message
    uvicorn.run(
        create_app(cfg),
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        timeout_graceful_shutdown=int(cfg.drain_s) + 5,
    )
