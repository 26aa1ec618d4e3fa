"""The OpenAI-compatible routes: `/v1/images/generations` and `/v1/models`, with OpenAI's error shape."""

# No `from __future__ import annotations` here: FastAPI must resolve the request models, which are
# built from the configured limits.

import asyncio
import base64
import dataclasses
import secrets
import time
from typing import Any

from finestyle.config import ServeConfig
from finestyle.runtime.generate import (
    Backend,
    GenerationRequest,
    negative_with_exclusions,
    provenance,
)
from finestyle.serve.batcher import encode_pngs, style_of, submit_request
from finestyle.serve.metrics import Metrics
from finestyle.serve.requests import (
    known_scheduler,
    models_list,
    plain_model_id,
    request_fields,
    request_problem,
    size_field,
    warn_headers,
)


def images_model(cfg: ServeConfig) -> Any:
    """POST /v1/images/generations: OpenAI's fields, plus FineStyle's request options as extra body
    fields (OpenAI's `n`, `size` and `model` stand for num_images, width x height and style)."""
    from pydantic import ConfigDict, Field, create_model, field_validator

    n = request_fields(cfg)["num_images"]
    return create_model(
        "ImagesBody",
        __config__=ConfigDict(extra="forbid"),
        __validators__={
            "wxh": field_validator("size")(classmethod(size_field(cfg))),
            "known_scheduler": field_validator("scheduler")(classmethod(known_scheduler)),
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
    """The fields `request_problem` reads, from an OpenAI body."""
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


def add_openai_routes(app: Any, state: dict[str, Any], cfg: ServeConfig, metrics: Metrics) -> None:
    """GET /v1/models and POST /v1/images/generations (OpenAI's shapes; `model` is the style)."""
    from fastapi.responses import JSONResponse

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
        plain_id = plain_model_id(be)
        style = body.model if be.kv is not None else (None if body.model in (None, plain_id) else body.model)
        problem = request_problem(_images_view(body, style), be, cfg)
        if problem:
            metrics.observe(problem[0], None)
            code = "model_not_found" if problem[0] == 404 else "invalid_value"
            return openai_error(
                problem[0], problem[1], param="model" if problem[0] == 404 else None, code=code
            )
        req = _images_request(body, style)
        warn = warn_headers(be, req)
        status, result = await submit_request(state, cfg, req)
        if status != 200:
            metrics.observe(status, None, style_of(be, req))
            return openai_error(status, result, code="overloaded" if status == 503 else "timeout")
        pngs = await asyncio.to_thread(encode_pngs, result, provenance(req, be))
        metrics.observe(200, time.perf_counter() - t0, style_of(be, req))
        out = {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(p).decode()} for p in pngs],
        }
        return JSONResponse(out, headers=warn) if warn else out
