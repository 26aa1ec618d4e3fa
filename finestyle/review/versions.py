"""Reviewed dataset versions: a prepared dataset's rows, a person's edits, and a new version on disk.

A review never changes a dataset in place. `save_version` applies the edits (a row's text, a dropped
row, a redrawn box whose crop is recut from its source image) to a copy of the rows and publishes
them as a new dataset folder, with its own content key, a review record on its card and in
`report.json` (what changed, when, the previous version's key) and a fresh preview sheet. Training
from it is an ordinary `finestyle train DATASET`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from finestyle.artifacts.dataset import COLUMNS, dataset_fingerprint, write_dataset
from finestyle.core.errors import UserError
from finestyle.core.fs import clean_stale_temps, hash_json, staging_dir, write_json
from finestyle.core.geometry import bucket_size
from finestyle.core.text import fits, phrase_in_window, trim_to_fit, window
from finestyle.prepare.ingest import ImageRejected, load_image
from finestyle.prepare.stage import common_root


class ReviewError(UserError):
    """An edit that cannot be applied: the page shows the message; nothing is written."""


class StaleDataset(UserError):
    """The dataset changed since the page (or the import file) read it."""


@dataclass
class Edits:
    """What a person changed, by row index of the version under review."""

    texts: dict[int, str] = field(default_factory=dict)
    drops: set[int] = field(default_factory=set)
    boxes: dict[int, list[int]] = field(default_factory=dict)
    note: str = ""

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Edits:
        try:
            return cls(
                texts={int(k): str(v) for k, v in (obj.get("texts") or {}).items()},
                drops={int(i) for i in obj.get("drops") or []},
                boxes={
                    int(k): [int(round(float(c))) for c in v] for k, v in (obj.get("boxes") or {}).items()
                },
                note=str(obj.get("note") or ""),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise ReviewError(
                f"edits: {exc}; expected texts {{row: text}}, drops [row], boxes {{row: [x0, y0, x1, y1]}}"
            ) from exc

    def empty(self) -> bool:
        return not (self.texts or self.drops or self.boxes)


def dataset_key(folder: str | Path) -> str:
    """The content key a page or an import file pins: a changed key means the dataset changed."""
    return dataset_fingerprint(folder)


def read_report(folder: str | Path) -> dict[str, Any]:
    p = Path(folder) / "report.json"
    if not p.is_file():
        raise UserError(f"{folder}: no report.json; `finestyle review` reads a `finestyle prepare` output")
    return json.loads(p.read_text())


def load_rows(folder: str | Path) -> list[dict[str, Any]]:
    """Every column of a prepared dataset's rows (PIL crops included), in order."""
    folder = Path(folder)
    if not (folder / "dataset_info.json").exists():
        raise UserError(
            f"{folder}: not a `finestyle prepare` output (no dataset_info.json); prepare it first"
        )
    from datasets import load_from_disk

    ds = load_from_disk(str(folder))
    rows = []
    for r in ds:
        r = dict(r)
        r["image"] = r["image"].convert("RGB")
        r["bbox"], r["crop"], r["bucket"] = list(r["bbox"]), list(r["crop"]), list(r["bucket"])
        rows.append(r)
    return rows


def source_path(folder: str | Path, report: dict[str, Any], row: dict[str, Any]) -> Path:
    """Where a row's source image is: its `source` under the prepare inputs' common folder."""
    root = common_root((report.get("config") or {}).get("images") or [])
    p = Path(root) / row["source"]
    if not p.is_absolute() and not p.exists():
        p = Path(folder).parent / p  # a relative input folder, seen from the dataset's parent
    return p


def load_source(folder: str | Path, report: dict[str, Any], row: dict[str, Any]) -> Image.Image:
    """The row's source image, checked against the pixels the row was cut from."""
    p = source_path(folder, report, row)
    try:
        li = load_image(p, min_side=1)
    except ImageRejected as exc:
        raise ReviewError(
            f"source image {str(p)!r} of this row cannot be read ({exc}); restore it to recut"
        ) from exc
    if li.sha256 != row["source_sha256"]:
        raise ReviewError(
            f"source image {str(p)!r} changed since prepare (its pixels differ), so a box cannot be recut "
            "from it; restore the original or prepare again"
        )
    return li.image


def text_view(tokenizers: list[Any], text: str) -> dict[str, Any]:
    """The text as the model reads it: the words every encoder keeps, and the words past a window."""
    words = text.split()
    if not tokenizers or fits(tokenizers, text):
        return {"kept": words, "cut": [], "window": window(tokenizers[0]) if tokenizers else 0}
    k = trim_to_fit(tokenizers, lambda w: " ".join(w), words)
    return {"kept": words[:k], "cut": words[k:], "window": window(tokenizers[0])}


def _recut(row: dict[str, Any], source: Image.Image, box: list[int]) -> None:
    x0, y0, x1, y1 = box
    w, h = source.size
    if len(box) != 4 or not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ReviewError(
            f"box {box} is outside the {w}x{h} source image {row['source']!r}; draw it inside the picture"
        )
    if x1 - x0 < 8 or y1 - y0 < 8:
        raise ReviewError(f"box {box} is smaller than 8x8 px; draw a larger box")
    crop = source.crop((x0, y0, x1, y1))
    cap = 2 * int(row["resolution"])
    if max(crop.size) > cap:
        crop = crop.copy()
        crop.thumbnail((cap, cap), resample=3)
    row.update(
        image=crop,
        bbox=list(box),
        crop=list(box),
        width=crop.width,
        height=crop.height,
        bucket=list(bucket_size(crop.size, int(row["resolution"]), 8)),
    )


def apply_edits(
    folder: str | Path,
    rows: list[dict[str, Any]],
    edits: Edits,
    tokenizers: list[Any],
    style: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the new rows, the change list). Raises ReviewError, naming the row, before anything is written."""
    report = read_report(folder)
    n = len(rows)
    for i in [*edits.texts, *edits.drops, *edits.boxes]:
        if not 0 <= i < n:
            raise ReviewError(f"row {i}: there is no such row (the dataset has {n}); reload the page")
    changes: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, r in enumerate(rows):
        if i in edits.drops:
            changes.append({"row": i, "change": "dropped", "text": r["text"]})
            continue
        r = dict(r)
        if i in edits.texts:
            text = " ".join(edits.texts[i].split())
            if not text:
                raise ReviewError(f"row {i}: the text is empty; write what the crop shows, or drop the row")
            if style and not phrase_in_window(tokenizers, text, style):
                raise ReviewError(
                    f"row {i}: the style phrase {style!r} falls past the text encoder's "
                    f"{window(tokenizers[0])}-token window; shorten the text"
                )
            if text != r["text"]:
                changes.append({"row": i, "change": "text", "from": r["text"], "to": text})
                r["text"] = text
        if i in edits.boxes and list(edits.boxes[i]) != list(r["crop"]):
            before = list(r["crop"])
            _recut(r, load_source(folder, report, r), list(edits.boxes[i]))
            changes.append({"row": i, "change": "box", "from": before, "to": list(r["crop"])})
        out.append(r)
    if not out:
        raise ReviewError("every row is dropped; a dataset needs at least one row")
    return out, changes


def content_key(rows: list[dict[str, Any]]) -> str:
    """A version's key: what training reads from it (each crop's pixels, text and bucket)."""
    from finestyle.prepare.ingest import pixel_hash

    return hash_json([[pixel_hash(r["image"]), r["text"], r["bucket"]] for r in rows])


def default_out(folder: str | Path, key: str) -> Path:
    folder = Path(folder).resolve()
    return folder.parent / f"{folder.name.split('.r-')[0]}.r-{key[:10]}"


def save_version(
    folder: str | Path,
    rows: list[dict[str, Any]],
    changes: list[dict[str, Any]],
    note: str = "",
    out: str | Path | None = None,
    approved: bool = False,
    tokenizers: list[Any] | None = None,
    style: str = "",
) -> dict[str, Any]:
    """Publish `rows` as a new dataset version (atomically) and return its review record."""
    folder = Path(folder)
    report = read_report(folder)
    parent_key = dataset_key(folder)
    key = content_key(rows)
    dest = Path(out) if out else default_out(folder, key)
    if dest.resolve() == folder.resolve():
        raise ReviewError(f"--out {str(dest)!r} is the dataset under review; a review writes a new folder")
    record = {
        "reviewed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "previous": str(folder.resolve()),
        "previous_key": parent_key,
        "key": key,
        "approved": approved,
        "note": note,
        "rows_before": len(rows) + sum(c["change"] == "dropped" for c in changes),
        "changes": changes,
        "history": (report.get("review") or {}).get("history", [])
        + ([{"key": parent_key, "reviewed_at": (report.get("review") or {}).get("reviewed_at")}]),
    }
    new = dict(report)
    new["cache_key"] = key
    new["review"] = record
    counts = dict(new["counts"])
    per_method: dict[str, int] = {}
    for r in rows:
        per_method[r["method"]] = per_method.get(r["method"], 0) + 1
    counts.update(rows=len(rows), rows_per_method=per_method)
    if tokenizers is not None:
        counts["rows_style_outside_window"] = sum(
            1 for r in rows if not phrase_in_window(tokenizers, r["text"], style)
        )
    new["counts"] = counts
    clean_stale_temps(dest.parent, dest.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(dest) as tmp:
        write_dataset(tmp, [{k: r[k] for k in COLUMNS} for r in rows], new)
        write_json(tmp / "report.json", new)
    return {**record, "out": str(dest)}
