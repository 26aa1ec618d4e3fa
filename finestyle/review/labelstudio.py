"""Label Studio round trip: a prepared dataset's rows as Label Studio tasks, and its export back.

`export_tasks` writes a folder with `tasks.json` (one task per row: the source image, the row's box as a
`rectanglelabels` region in percent of the image, its text as a `textarea`), `label_config.xml` (the
labelling interface those tasks fit) and `images/` (the source images, which Label Studio serves as
local files). A person relabels there; Label Studio's JSON export of the project goes to
`import_tasks`, which turns each task's latest annotation into edits and publishes a new dataset
version, as the review page does. A row whose task is missing from the file, or whose annotation
ticks `drop`, is dropped. The file must come from the version it was exported from (its key is in every
task); otherwise the import refuses it and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from finestyle.core.errors import UserError
from finestyle.core.fs import staging_dir, write_json

from .versions import (
    Edits,
    StaleDataset,
    apply_edits,
    dataset_key,
    load_rows,
    read_report,
    save_version,
    source_path,
)

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image">
    {labels}
  </RectangleLabels>
  <TextArea name="text" toName="image" editable="true" maxSubmissions="1" value="$text"/>
  <Choices name="drop" toName="image" choice="single">
    <Choice value="drop"/>
  </Choices>
</View>
"""


def export_tasks(folder: str | Path, to: str | Path) -> Path:
    """Write the Label Studio folder for `folder`'s rows (atomically). Returns it."""
    folder, to = Path(folder), Path(to)
    report, rows, key = read_report(folder), load_rows(folder), dataset_key(folder)
    tasks, concepts, copied = [], set(), {}
    with staging_dir(to) as tmp:
        (tmp / "images").mkdir()
        for i, r in enumerate(rows):
            src = source_path(folder, report, r)
            if r["source"] not in copied:
                if not src.is_file():
                    raise UserError(f"row {i}: source image {str(src)!r} is missing; restore it to export")
                name = f"{len(copied):04d}-{src.name}"
                shutil.copy2(src, tmp / "images" / name)
                copied[r["source"]] = name
            from PIL import Image

            with Image.open(src) as im:
                w, h = im.size
            x0, y0, x1, y1 = r["crop"]
            concepts.add(r["concept"])
            tasks.append(
                {
                    "id": i + 1,
                    "data": {
                        "image": f"/data/local-files/?d=images/{copied[r['source']]}",
                        "text": r["text"],
                        "finestyle_row": i,
                        "finestyle_key": key,
                        "concept": r["concept"],
                        "method": r["method"],
                        "source": r["source"],
                    },
                    "annotations": [
                        {
                            "result": [
                                {
                                    "id": f"box{i}",
                                    "type": "rectanglelabels",
                                    "from_name": "box",
                                    "to_name": "image",
                                    "original_width": w,
                                    "original_height": h,
                                    "image_rotation": 0,
                                    "value": {
                                        "x": 100 * x0 / w,
                                        "y": 100 * y0 / h,
                                        "width": 100 * (x1 - x0) / w,
                                        "height": 100 * (y1 - y0) / h,
                                        "rotation": 0,
                                        "rectanglelabels": [r["concept"]],
                                    },
                                },
                                {
                                    "id": f"text{i}",
                                    "type": "textarea",
                                    "from_name": "text",
                                    "to_name": "image",
                                    "value": {"text": [r["text"]]},
                                },
                            ]
                        }
                    ],
                }
            )
        write_json(tmp / "tasks.json", tasks)
        labels = "\n    ".join(f'<Label value="{_xml(c)}"/>' for c in sorted(concepts))
        (tmp / "label_config.xml").write_text(LABEL_CONFIG.format(labels=labels))
    return to


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def edits_from_tasks(tasks: list[dict[str, Any]], rows: list[dict[str, Any]], key: str) -> Edits:
    """Edits from a Label Studio JSON export of tasks made by `export_tasks` for the version `key`."""
    if not isinstance(tasks, list):
        raise UserError("the import file is not Label Studio's JSON export (a list of tasks)")
    edits, seen = Edits(), set()
    for n, t in enumerate(tasks):
        data = t.get("data") or {}
        if "finestyle_row" not in data:
            raise UserError(
                f"task {n}: no data.finestyle_row; import only tasks that `--export label-studio` wrote"
            )
        if data.get("finestyle_key") != key:
            raise StaleDataset(
                f"task {n} was exported from version {str(data.get('finestyle_key'))[:10]}, not this dataset's "
                f"{key[:10]}; export again from the version you import into"
            )
        i = int(data["finestyle_row"])
        seen.add(i)
        anns = [a for a in t.get("annotations") or [] if not a.get("was_cancelled")]
        if not anns:
            continue
        for res in anns[-1].get("result") or []:
            v = res.get("value") or {}
            if res.get("type") == "rectanglelabels":
                w, h = res["original_width"], res["original_height"]
                box = [
                    v["x"] * w / 100,
                    v["y"] * h / 100,
                    (v["x"] + v["width"]) * w / 100,
                    (v["y"] + v["height"]) * h / 100,
                ]
                box = [int(round(c)) for c in box]
                if box != list(rows[i]["crop"]):
                    edits.boxes[i] = box
            elif res.get("type") == "textarea" and v.get("text"):
                text = " ".join(str(v["text"][-1]).split())
                if text != rows[i]["text"]:
                    edits.texts[i] = text
            elif res.get("type") == "choices" and "drop" in (v.get("choices") or []):
                edits.drops.add(i)
    edits.drops |= set(range(len(rows))) - seen
    return edits


def import_tasks(
    folder: str | Path, file: str | Path, out: str | Path | None = None, note: str = ""
) -> dict[str, Any]:
    """Apply a Label Studio export to `folder` and publish the new version. Returns its review record."""
    from finestyle.core.loading import load_tokenizers

    folder = Path(folder)
    try:
        tasks = json.loads(Path(file).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--import {str(file)!r}: cannot read it as JSON ({exc})") from exc
    rows = load_rows(folder)
    edits = edits_from_tasks(tasks, rows, dataset_key(folder))
    cfg = read_report(folder).get("config") or {}
    toks = load_tokenizers(cfg["base"]) if cfg.get("base") else []
    style = cfg.get("style") or ""
    new_rows, changes = apply_edits(folder, rows, edits, toks, style)
    return save_version(
        folder, new_rows, changes, note or f"imported from Label Studio: {file}", out, False, toks, style
    )
