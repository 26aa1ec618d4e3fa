"""Publishing a prepared dataset: HF `datasets` folder + ImageFolder copy + card + preview + report.

Also reads datasets back for training: a `prepare` output (load_from_disk) or any ImageFolder with
`train/metadata.jsonl` (`file_name`, `text`).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from finestyle.core.errors import UserError
from finestyle.core.fs import hash_json, sha256_file

COLUMNS = (
    "image",
    "text",
    "concept",
    "caption",
    "source",
    "source_sha256",
    "bbox",
    "crop",
    "method",
    "width",
    "height",
    "bucket",
    "resolution",
)


def features() -> Any:
    from datasets import Features, Sequence, Value
    from datasets import Image as HFImage

    return Features(
        {
            "image": HFImage(),
            "text": Value("string"),
            "concept": Value("string"),
            "caption": Value("string"),
            "source": Value("string"),
            "source_sha256": Value("string"),
            "bbox": Sequence(Value("int32"), length=4),
            "crop": Sequence(Value("int32"), length=4),
            "method": Value("string"),
            "width": Value("int32"),
            "height": Value("int32"),
            "bucket": Sequence(Value("int32"), length=2),
            "resolution": Value("int32"),
        }
    )


def contact_sheet(rows: list[dict[str, Any]], thumb: int = 160, cols: int = 6) -> Image.Image:
    """A grid of every crop with its training text underneath, for a person to judge the dataset."""
    font = ImageFont.load_default()
    text_h = 44
    n = max(1, len(rows))
    cols = min(cols, n)
    nrows = (n + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (thumb + 8) + 8, nrows * (thumb + text_h + 8) + 8), (250, 250, 250))
    d = ImageDraw.Draw(sheet)
    for i, r in enumerate(rows):
        x = 8 + (i % cols) * (thumb + 8)
        y = 8 + (i // cols) * (thumb + text_h + 8)
        im = r["image"].copy()
        im.thumbnail((thumb, thumb))
        sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        d.rectangle((x - 1, y - 1, x + thumb, y + thumb), outline=(200, 200, 200))
        label = f"[{r['method']}] {r['text']}"
        for k, line in enumerate(textwrap.wrap(label, width=thumb // 6)[:3]):
            d.text((x, y + thumb + 2 + 13 * k), line, fill=(20, 20, 20), font=font)
    return sheet


def dataset_card(report: dict[str, Any]) -> str:
    cfg = report["config"]
    counts = report["counts"]
    meta = {
        "pretty_name": f"FineStyle concept dataset: {cfg['style']}",
        "task_categories": ["text-to-image"],
        "size_categories": ["n<1K"] if counts["rows"] < 1000 else ["1K<n<10K"],
        "license": "other",
        "tags": ["finestyle", "style-personalization", "concept-crops"],
        "dataset_info": {
            "features": [{"name": c} for c in COLUMNS],
            "splits": [{"name": "train", "num_examples": counts["rows"]}],
        },
        "finestyle": {
            "style": cfg["style"],
            "method": report["method"],
            "captioner": cfg["captioner"],
            "base": cfg["base"],
            "template": cfg["template"],
            "cache_key": report["cache_key"],
            "counts": counts,
        },
    }
    import yaml

    concepts = sorted({c for img in report["images"] for c in img["concepts"]})
    return (
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"
        f"# FineStyle concept dataset: {cfg['style']}\n\n"
        f"Made by `finestyle prepare` from {counts['images_used']} reference image(s) with the "
        f"`{report['method']}` concept method: each image became several crop–text pairs, one per visual "
        "concept, so that a style adapter learns the style without the references' content.\n\n"
        f"- rows: {counts['rows']} (per method: {counts['rows_per_method']})\n"
        f"- skipped inputs: {counts['skipped']} (see `report.json`)\n"
        f"- texts trimmed to fit the base model's text window: {counts.get('rows_text_trimmed', 0)} row(s) "
        "(the caption's own words go first; the style phrase and each row's concept are kept)\n"
        + (
            f"- **{counts['rows_style_outside_window']} row(s) still cut the style phrase** at the window: "
            "`finestyle train` refuses this dataset; shorten the template or the style\n"
            if counts.get("rows_style_outside_window")
            else ""
        )
        + f"- captioner: `{cfg['captioner']}`; localisation model: `{cfg['base']}`\n"
        f"- text template: `{cfg['template']}`\n"
        f"- concepts: {', '.join(concepts) or '(whole images only)'}\n\n"
        "## What the rows contain, and why\n\n"
        "- `bbox` is the concept's box and `crop` the region each row was cut from, both xyxy in the "
        "source image's pixels, so the recipe's rules can be checked from the dataset alone.\n"
        f"- Context around a concept: it fills at most {cfg.get('concept_share', [1.0])} of its crop's side "
        f"(`concept_share`, one crop per value), plus a margin of {cfg.get('margin')} of its box, and a crop "
        f"is at least {cfg.get('min_crop')} px per side"
        + (
            f" and is never enlarged more than {cfg['max_upscale']}x to reach the training resolution "
            f"(`max_upscale`)"
            if cfg.get("max_upscale")
            else ""
        )
        + ": crops that zoom a concept to fill the frame teach the concept's words to fill the frame.\n"
        + (
            f"- A crop's text names every concept with at least {cfg['name_covered']} of its box inside "
            "the crop (`name_covered`), so the words of what a crop shows own its pixels.\n"
            if cfg.get("name_covered")
            else "- A crop's text names its own concept (`name_covered` 0).\n"
        )
        + "- The background row's text is the captioner's words for the background (`method` "
        "`background`), never a bare word the text encoder does not know.\n"
        "- Each row's `bucket` is its training size: multiples of 8 px at the aspect nearest the crop's, "
        "so a centre crop to it cuts little.\n\n"
        "Load it with `datasets.load_from_disk(DIR)`, or as an ImageFolder from `train/` "
        "(`metadata.jsonl` holds `file_name` and `text`). `preview.png` shows every crop with its text.\n"
    ) + review_section(report.get("review"))


def review_section(review: dict[str, Any] | None) -> str:
    """The card's record of a `finestyle review`: when, from which version, what changed."""
    if not review:
        return ""
    kinds: dict[str, int] = {}
    for c in review["changes"]:
        kinds[c["change"]] = kinds.get(c["change"], 0) + 1
    lines = [
        "\n## Review\n",
        f"- reviewed at {review['reviewed_at']}"
        + (", **approved**" if review.get("approved") else ", saved (not yet approved)"),
        f"- previous version: `{review['previous']}` (key `{review['previous_key']}`)",
        f"- this version's key: `{review['key']}`",
        f"- changes: {', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or 'none'} "
        f"({review['rows_before']} rows before)",
    ]
    if review.get("note"):
        lines.append(f"- note: {review['note']}")
    for c in review["changes"][:50]:
        if c["change"] == "text":
            lines.append(f"  - row {c['row']}: text {c['from']!r} -> {c['to']!r}")
        elif c["change"] == "box":
            lines.append(f"  - row {c['row']}: box {c['from']} -> {c['to']} (crop recut from the source)")
        else:
            lines.append(f"  - row {c['row']}: dropped ({c['text']!r})")
    return "\n".join(lines) + "\n"


def write_dataset(tmp: Path, rows: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """Write every artifact of a prepared dataset into `tmp` (the caller publishes it atomically)."""
    from datasets import Dataset

    ds = Dataset.from_list([{k: r[k] for k in COLUMNS} for r in rows], features=features())
    ds.save_to_disk(str(tmp))
    train = tmp / "train"
    train.mkdir()
    with open(train / "metadata.jsonl", "w") as f:
        for i, r in enumerate(rows):
            name = f"{i:05d}.png"
            r["image"].save(train / name)
            meta = {"file_name": name, **{k: r[k] for k in COLUMNS if k != "image"}}
            f.write(json.dumps(meta) + "\n")
    contact_sheet(rows).save(tmp / "preview.png")
    (tmp / "README.md").write_text(dataset_card(report))


# ------------------------------------------------------------------------------------------------
# reading for training


def dataset_fingerprint(folder: str | Path) -> str:
    """Content fingerprint of a dataset folder: its report's cache key, else a hash of its files."""
    folder = Path(folder)
    rep = folder / "report.json"
    if rep.exists():
        key = json.loads(rep.read_text()).get("cache_key")
        if key:
            return key
    meta = folder / "train" / "metadata.jsonl"
    files = sorted(p for p in (folder / "train").glob("*") if p.is_file()) if meta.exists() else []
    return hash_json([(p.name, sha256_file(p)) for p in files])


def load_training_rows(folder: str | Path) -> list[dict[str, Any]]:
    """Rows (PIL image, text, bucket) from a `prepare` dataset or an ImageFolder with metadata.jsonl."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset {str(folder)!r} does not exist; run `finestyle prepare` first")
    if (folder / "dataset_info.json").exists() or (folder / "state.json").exists():
        from datasets import load_from_disk

        ds = load_from_disk(str(folder))
        if "image" not in ds.column_names or "text" not in ds.column_names:
            raise UserError(f"dataset {str(folder)!r} lacks the `image`/`text` columns")
        rows = []
        for r in ds:
            rows.append(
                {
                    "image": r["image"].convert("RGB"),
                    "text": r["text"],
                    "bucket": tuple(r["bucket"]) if r.get("bucket") else None,
                    "concept": r.get("concept", ""),
                    "method": r.get("method", ""),
                }
            )
        return rows
    meta = next(
        (p for p in (folder / "train" / "metadata.jsonl", folder / "metadata.jsonl") if p.exists()), None
    )
    if meta is None:
        raise UserError(
            f"dataset {str(folder)!r} is neither a `finestyle prepare` output nor an "
            "ImageFolder with train/metadata.jsonl (file_name, text)"
        )
    rows = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
            img = Image.open(meta.parent / m["file_name"]).convert("RGB")
        except (ValueError, KeyError, OSError) as exc:
            raise UserError(
                f"{meta}:{n}: bad row ({type(exc).__name__}: {exc}); each line needs "
                "file_name (an image beside it) and text"
            ) from exc
        rows.append(
            {
                "image": img,
                "text": m.get("text", ""),
                "bucket": tuple(m["bucket"]) if m.get("bucket") else None,
                "concept": m.get("concept", ""),
                "method": m.get("method", ""),
            }
        )
    if not rows:
        raise UserError(f"dataset {str(folder)!r} has no rows")
    return rows
