"""Shared task settings and artifact helpers for the FineStyle flows."""

from __future__ import annotations

from collections.abc import Callable
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


def table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    if rows:
        create_table_artifact(key=_key(key), table=rows, description=description)
