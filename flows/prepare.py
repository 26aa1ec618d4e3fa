"""`prepare_dataset` flow: reference images -> concept crop/caption dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task

from finestyle.config import PrepareConfig, from_dict, to_dict
from finestyle.images import discover
from finestyle.prepare import run_prepare, summary_table
from flows.common import RETRY, markdown, table


@task(**RETRY)
def discover_inputs(images: list[str]) -> dict[str, Any]:
    """List candidate images and skipped entries (paths only)."""
    cands, skipped = discover(images)
    return {"candidates": [str(c) for c in cands], "skipped": [s.as_dict() for s in skipped]}


@task(**RETRY)
def build_dataset(config: dict[str, Any]) -> dict[str, Any]:
    """Ingest, extract concepts, caption and publish (content-keyed: reuses an identical dataset)."""
    return run_prepare(from_dict(PrepareConfig, config))


@task
def publish_prepare_artifacts(result: dict[str, Any]) -> None:
    rep = json.loads((Path(result["out"]) / "report.json").read_text())
    c = rep["counts"]
    skipped = "\n".join(f"- `{s['path']}`: {s['reason']}" for s in rep["skipped"]) or "- none"
    markdown(
        "prepare-summary",
        (
            f"# prepare: {'reused' if result['reused'] else 'built'} `{result['out']}`\n\n"
            f"- method: **{rep['method']}**, style: *{rep['config']['style']}*\n"
            f"- rows: **{c['rows']}** from {c['images_used']} image(s) ({c['rows_per_method']})\n"
            f"- preview: `{result['out']}/preview.png`, report: `{result['out']}/report.json`\n\n"
            f"## Skipped inputs ({c['skipped']})\n{skipped}\n"
        ),
        "FineStyle prepare summary",
    )
    table("prepare-concepts", summary_table(Path(result["out"]) / "report.json"), "Concepts per image")


@flow(name="prepare_dataset", log_prints=True)
def prepare_dataset(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stage 1 as a flow. `config` is a PrepareConfig as a dict (validated here)."""
    cfg = from_dict(PrepareConfig, config or {})
    found = discover_inputs(cfg.images)
    print(f"prepare: {len(found['candidates'])} candidate image(s), {len(found['skipped'])} skipped entries")
    result = build_dataset(to_dict(cfg))
    publish_prepare_artifacts(result)
    return result
