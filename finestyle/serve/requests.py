"""What the server accepts: the request model built from the configured limits, and the checks that turn
a bad request into a 4xx with a message.
"""

# No `from __future__ import annotations` here: FastAPI must resolve the request models, which are
# built from the configured limits.

import dataclasses
import secrets
import sys
from typing import Any

from finestyle.config import EMPTY_PROMPT, ServeConfig
from finestyle.runtime.generate import (
    SCHEDULERS,
    Backend,
    GenerationRequest,
    style_cut_warning,
)


def known_scheduler(cls: Any, v: str | None) -> str | None:
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
            "known_scheduler": field_validator("scheduler")(classmethod(known_scheduler)),
            "multiple_of_8": field_validator("width", "height")(classmethod(_multiple_of_8)),
        },
        response_format=(str, Field("png", pattern="^(png|json)$")),
        **request_fields(cfg),
    )


def describe_model(be: Backend, cfg: ServeConfig) -> dict[str, Any]:
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


def request_problem(body: Any, be: Backend, cfg: ServeConfig) -> tuple[int, str] | None:
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
            f"unknown style {style!r}: this export serves one style (use {plain_model_id(be)!r} or omit it)",
        )
    if be.kv is not None and style and style not in be.styles:
        return 404, f"unknown style {style!r}; this server has: {', '.join(be.styles)}"
    if body.style_guidance > 0 and be.family in ("sd3", "flux") and not be.parts.get("adapter"):
        return (
            422,
            "style_guidance on SD 3.x / FLUX.1 exports is not yet built (torch with --adapter runs it); use 0",
        )
    if body.style_guidance > 0 and be.unet_base is None and be.kv is None:
        return 422, "style_guidance needs an export made with --with-base-unet"
    return None


def plain_model_id(be: Backend) -> str:
    from finestyle.artifacts.styles import style_slug

    return style_slug(be.manifest.get("style") or "model")


def to_request(body: Any) -> GenerationRequest:
    """The runtime's request from a validated body; an omitted seed becomes a fresh random one."""
    values = {f.name: getattr(body, f.name) for f in dataclasses.fields(GenerationRequest)}
    if values["seed"] is None:
        values["seed"] = secrets.randbelow(2**32)
    return GenerationRequest(**values)


def size_field(cfg: ServeConfig) -> Any:
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


def models_list(be: Backend) -> dict[str, Any]:
    """GET /v1/models in OpenAI's list shape: one entry per style (a plain export: its one style)."""
    m = be.manifest
    created = int(m.get("created", 0))
    if be.kv is None:
        entries = [(plain_model_id(be), m.get("style"), m.get("concepts", []))]
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


WARNING_HEADER = "X-FineStyle-Warning"


def warn_headers(be: Backend, req: GenerationRequest) -> dict[str, str]:
    """The response header (and a log line) when the prompt's style words fall past the text window."""
    msg = style_cut_warning(be, req)
    if not msg:
        return {}
    print(f"serve: warning: {msg}", file=sys.stderr, flush=True)
    return {WARNING_HEADER: msg}
