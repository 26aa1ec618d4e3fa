"""Shared task settings and artifact helpers for the FineStyle flows."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from finestyle.core.errors import UserError


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry file-system/network hiccups; never retry bad input, which fails the same way again."""
    try:
        state.result(raise_on_failure=True)
    except UserError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


RETRY = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_bad_input)


def run_log() -> Callable[[str], None]:
    """The stage's own lines (progress, "resumed from step-N", parity) into the run's log, where the
    UI and `prefect flow-run logs` show them. The library writes them to stderr, which Prefect's
    print capture does not see."""
    return get_run_logger().info


def _key(text: str) -> str:
    """Artifact keys: lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60] or "finestyle"


def markdown(key: str, body: str, description: str) -> None:
    create_markdown_artifact(key=_key(key), markdown=body, description=description)


INLINE_MAX_SIDE = 512
"""Pictures in artifacts are downscaled to at most this many pixels a side, and"""
INLINE_MAX_BYTES = 300_000
"""at most this many bytes of PNG (halved again until they fit): Prefect stores each
artifact's markdown in its database, and its UI renders `data:` images inline."""


def inline_image(path: str | Path, alt: str) -> str:
    """A markdown image of the PNG at `path`, embedded as a `data:` URI so Prefect's UI shows the picture
    itself (a file path only helps on the machine that ran the flow); "" when the file is missing."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        return ""
    with Image.open(p) as im:
        im = im.convert("RGB")
        side = INLINE_MAX_SIDE
        while True:
            small = im.copy()
            small.thumbnail((side, side))
            buf = io.BytesIO()
            small.save(buf, format="PNG", optimize=True)
            if buf.tell() <= INLINE_MAX_BYTES or side <= 64:
                break
            side //= 2
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if rows:
        create_table_artifact(key=_key(key), table=rows, description=description)
