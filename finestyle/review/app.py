"""`finestyle review DATASET`: a local page to look at, fix and approve a prepared dataset's rows.

FastAPI on 127.0.0.1 by default. The page (`page.html`) lists every row: its crop, its box on the
source image, its text as the model reads it (words past the encoder's window struck through), its
concept, method and bucket. Edits stay in the page until Save or Approve, which post them with the
key of the version the page read; the server answers 409 when that version is no longer the one under
review (another tab saved, or the dataset was prepared again), 422 with a message for an edit it
cannot apply. A save publishes a new version (`versions.save_version`) and the page moves on to it.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from finestyle.core.errors import UserError

from .versions import (
    Edits,
    ReviewError,
    apply_edits,
    dataset_key,
    load_rows,
    load_source,
    read_report,
    save_version,
    text_view,
)

Decide = Callable[[dict[str, Any]], str | None]
"""Called with the review record after Approve or Reject (e.g. to resume a paused flow run); returns a
line for the page, or None."""


class ReviewState:
    """The version under review, its rows and what the page needs to show them."""

    def __init__(self, folder: str | Path, out: str | Path | None = None, decide: Decide | None = None):
        self.lock = threading.Lock()
        self.out = out
        self.decide = decide
        self.finished: dict[str, Any] | None = None
        self.tokenizers: list[Any] = []
        self.load(Path(folder))

    def load(self, folder: Path) -> None:
        self.folder = folder
        self.report = read_report(folder)
        self.rows = load_rows(folder)
        self.key = dataset_key(folder)
        cfg = self.report.get("config") or {}
        self.style = cfg.get("style") or ""
        self._sources: dict[str, Image.Image] = {}
        base = cfg.get("base")
        self.tokenizer_note = ""
        if base and not self.tokenizers:
            try:
                from finestyle.core.loading import load_tokenizers

                self.tokenizers = load_tokenizers(base)
            except Exception as exc:  # noqa: BLE001 - the page still works, without the window view
                self.tokenizer_note = (
                    f"the base model's tokenizer could not be loaded ({exc}); windows not shown"
                )

    def source(self, i: int) -> Image.Image:
        r = self.rows[i]
        if r["source"] not in self._sources:
            self._sources[r["source"]] = load_source(self.folder, self.report, r)
        return self._sources[r["source"]]

    def describe(self) -> dict[str, Any]:
        rows = []
        for i, r in enumerate(self.rows):
            try:
                size = list(self.source(i).size)
            except ReviewError as exc:
                size, problem = None, str(exc)
            else:
                problem = ""
            rows.append(
                {
                    "i": i,
                    "text": r["text"],
                    "view": text_view(self.tokenizers, r["text"]),
                    "concept": r["concept"],
                    "method": r["method"],
                    "bucket": r["bucket"],
                    "bbox": r["bbox"],
                    "crop": r["crop"],
                    "source": r["source"],
                    "source_size": size,
                    "source_problem": problem,
                }
            )
        return {
            "dataset": str(self.folder),
            "name": self.folder.name,
            "key": self.key,
            "style": self.style,
            "review": self.report.get("review"),
            "rows": rows,
            "tokenizer_note": self.tokenizer_note,
            "flow_run": bool(self.decide),
            "finished": self.finished,
        }


def _png(im: Image.Image, limit: int = 1024) -> bytes:
    if max(im.size) > limit:
        im = im.copy()
        im.thumbnail((limit, limit))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def create_review_app(state: ReviewState) -> Any:
    from fastapi import Body, FastAPI, HTTPException, Response
    from fastapi.responses import HTMLResponse

    app = FastAPI(title="FineStyle review", docs_url=None, redoc_url=None)
    page = resources.files("finestyle.review").joinpath("page.html").read_text()

    def row(i: int) -> dict[str, Any]:
        if not 0 <= i < len(state.rows):
            raise HTTPException(404, f"row {i}: no such row (the dataset has {len(state.rows)})")
        return state.rows[i]

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/dataset")
    def dataset() -> dict[str, Any]:
        with state.lock:
            return state.describe()

    @app.get("/api/rows/{i}/crop.png")
    def crop(i: int) -> Response:
        return Response(_png(row(i)["image"]), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/rows/{i}/source.png")
    def source(i: int) -> Response:
        row(i)
        try:
            im = state.source(i)
        except ReviewError as exc:
            raise HTTPException(404, str(exc)) from None
        return Response(_png(im), media_type="image/png")

    def _check_key(key: str) -> None:
        current = dataset_key(state.folder) if state.folder.exists() else None
        if key != state.key or current != state.key:
            raise HTTPException(
                409,
                f"this page shows version {key[:10]}, but the version under review is now "
                f"{(current or state.key)[:10]}: reload the page (your unsaved edits are listed below)",
            )

    def _save(body: dict[str, Any], approved: bool) -> dict[str, Any]:
        with state.lock:
            if state.finished:
                raise HTTPException(409, "this review is already decided; nothing was written")
            _check_key(str(body.get("key", "")))
            edits = Edits.from_json(body.get("edits") or {})
            edits.note = str(body.get("note") or "")
            try:
                rows, changes = apply_edits(state.folder, state.rows, edits, state.tokenizers, state.style)
                record = save_version(
                    state.folder,
                    rows,
                    changes,
                    edits.note,
                    state.out,
                    approved,
                    state.tokenizers,
                    state.style,
                )
            except UserError as exc:
                raise HTTPException(422, str(exc)) from None
            state.out = None  # a second save in one review writes its own version beside the first
            state.load(Path(record["out"]))
            if approved:
                state.finished = {"approved": True, "dataset": record["out"], "key": record["key"]}
                if state.decide:
                    record["resumed"] = state.decide(record)
            return record

    @app.post("/api/save")
    def save(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return _save(body, approved=False)

    @app.post("/api/approve")
    def approve(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return _save(body, approved=True)

    @app.post("/api/reject")
    def reject(body: dict[str, Any] = Body(...)) -> dict[str, Any]:
        with state.lock:
            if state.finished:
                raise HTTPException(409, "this review is already decided")
            record = {"approved": False, "note": str(body.get("note") or ""), "key": state.key}
            state.finished = record
            if state.decide:
                record["resumed"] = state.decide(record)
            return record

    return app


def serve_review(
    folder: str | Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    out: str | Path | None = None,
    decide: Decide | None = None,
    log: Callable[[str], None] = print,
) -> Any:
    """Run the review page until interrupted (or, with `decide`, until the review is decided)."""
    import uvicorn

    from finestyle.core.env import check_port_free

    state = ReviewState(folder, out, decide)
    check_port_free(host, port)
    app = create_review_app(state)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    log(f"review: http://{host}:{port}/ ({len(state.rows)} rows of {state.folder}); Ctrl-C to stop")
    server.run()
    return state
