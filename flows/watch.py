"""`prepare_watched` flow: the scheduled data flow.

On a schedule, every reference-image folder directly under `watch_dir` is prepared into
`datasets_dir/<folder name>`. Results are keyed by content, so unchanged folders are skipped (their
dataset is reused in a second) and only new or changed folders do work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.common import markdown, table
from flows.prepare import prepare_dataset


@flow(name="prepare_watched", log_prints=True)
def prepare_watched(
    watch_dir: str = "data/incoming",
    datasets_dir: str = "data/prepared",
    style: str = "flat pastel paper-cut illustration",
    captioner: str = "builtin:tiny-blip",
    base: str = "builtin:tiny-sd",
    concepts: str = "auto",
    resolution: int = 512,
) -> dict[str, Any]:
    """Prepare each new or changed folder under `watch_dir`; skip unchanged ones."""
    root = Path(watch_dir)
    if not root.is_dir():
        from finestyle.core.errors import UserError

        raise UserError(
            f"watch_dir {watch_dir!r} does not exist; create it and put one folder of reference "
            "images per style in it"
        )
    results = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cfg = {
            "images": [str(folder)],
            "style": style,
            "out": str(Path(datasets_dir) / folder.name),
            "captioner": captioner,
            "base": base,
            "concepts": concepts,
            "resolution": resolution,
        }
        try:
            r = prepare_dataset(config=cfg)
            results[folder.name] = {
                "status": "skipped (unchanged)" if r.reused else "prepared",
                "rows": r.rows,
                "dataset": r.out,
            }
        except Exception as exc:  # noqa: BLE001 - one bad folder must not stop the others
            results[folder.name] = {"status": f"failed: {exc}", "rows": 0, "dataset": ""}
    table("watched-folders", [{"folder": k, **v} for k, v in results.items()], "Watched folders this run")
    n_new = sum(v["status"] == "prepared" for v in results.values())
    markdown(
        "watched-summary",
        f"# prepare_watched\n\n{len(results)} folder(s) under `{watch_dir}`: "
        f"{n_new} prepared, {len(results) - n_new} skipped or failed.",
        "Scheduled data flow",
    )
    return results
