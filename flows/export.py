"""`export_model` flow: merge -> export -> validate -> (optimize) -> (TensorRT) -> publish."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task

from finestyle.config import ExportConfig, from_dict, to_dict
from finestyle.export import run_export
from flows.common import RETRY, markdown, table


@task(**RETRY)
def export_task(config: dict[str, Any]) -> dict[str, Any]:
    """Merge, export, prove parity, publish with a manifest (content-keyed reuse)."""
    return run_export(from_dict(ExportConfig, config))


@task
def publish_export_artifacts(result: dict[str, Any]) -> None:
    m = json.loads((Path(result["out"]) / "manifest.json").read_text())
    table(
        "export-parity",
        [
            {"check": k, "max_abs_diff": f"{v['max_abs_diff']:.3g}", "threshold": v["atol"]}
            for k, v in m["parity"].items()
        ]
        + [
            {
                "check": "merge",
                "max_abs_diff": f"{m['merge']['max_abs_diff']:.3g}",
                "threshold": m["merge"]["atol"],
            }
        ],
        "Parity figures (a failure stops the export)",
    )
    markdown(
        "export-summary",
        (
            f"# export: {'reused' if result.get('reused') else 'built'} `{result['out']}`\n\n"
            f"- manifest: `{result['out']}/manifest.json` ({len(m['files'])} files hashed)\n"
            f"- base: `{m['base_model']}`, lora scale {m['lora_scale']}, precision {m['precision']}\n"
            f"- concepts learned: {', '.join(m.get('concepts') or []) or '-'}\n"
        ),
        "FineStyle export summary",
    )


@flow(name="export_model", log_prints=True)
def export_model(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stage 3 as a flow; returns the export path and parity summary."""
    cfg = from_dict(ExportConfig, config or {})
    result = export_task(to_dict(cfg))
    publish_export_artifacts(result)
    return result
