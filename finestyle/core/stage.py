"""Reuse of a stage's finished output: one rule for prepare, train and export.

Each stage publishes a record (`report.json`, `manifest.json`) holding the content key of its inputs
and options. A later run with the same key reuses that output instead of rebuilding it, unless
`--force`; an output that cannot be read or verified is rebuilt, and the log says why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from finestyle.core.errors import UserError
from finestyle.core.fs import read_json


def find_reusable(
    out: str | Path,
    record: str,
    key: str,
    *,
    stage: str,
    same: str,
    force: bool = False,
    needs: tuple[str, ...] = (),
    load: Callable[[Path], dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """The record of the output in `out` if its content key is `key` (and the files in `needs`
    exist), else None. `load` reads and verifies the record (default: the JSON file as it is)."""
    out = Path(out)
    if force or not (out / record).exists() or not all((out / n).exists() for n in needs):
        return None
    try:
        old = load(out) if load else read_json(out / record)
    except UserError as exc:
        log(f"{stage}: existing {out} is not reusable ({exc}); rebuilding")
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("cache_key") != key:
        return None
    log(f"{stage}: reusing {out} (same {same}; --force to rebuild)")
    return old
