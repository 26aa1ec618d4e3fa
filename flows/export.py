"""`export_model` flow: merge -> export -> validate -> optimize (optional) -> TensorRT (optional) -> publish.

Each step is a task wrapping one library function; they pass the path of the temporary folder the
export is built in. Any failure removes that folder: nothing that looks complete is left.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task

from finestyle.config import ExportConfig, from_dict, to_dict
from finestyle.export.registry import register_export
from finestyle.export.steps import (
    ExportResult,
    abort_export,
    begin_export,
    check_reuse,
    publish_export,
    step_bf16,
    step_merge,
    step_onnx,
    step_openvino,
    step_optimize,
    step_tensorrt,
    step_validate,
)
from flows.common import RETRY, markdown, run_log, table


def _cfg(config: dict[str, Any]) -> ExportConfig:
    return from_dict(ExportConfig, config)


@task
def reuse_task(config: dict[str, Any]) -> ExportResult | None:
    return check_reuse(_cfg(config), log=run_log())


@task(**RETRY)
def begin_task(config: dict[str, Any]) -> str:
    return begin_export(_cfg(config))


@task
def merge_task(config: dict[str, Any], tmp: str) -> dict[str, Any]:
    return step_merge(_cfg(config), tmp, log=run_log())


@task
def onnx_task(config: dict[str, Any], tmp: str) -> dict[str, Any]:
    return step_onnx(_cfg(config), tmp, log=run_log())


@task
def validate_task(config: dict[str, Any], tmp: str) -> dict[str, Any]:
    return step_validate(_cfg(config), tmp, log=run_log())


@task
def bf16_task(config: dict[str, Any], tmp: str) -> dict[str, Any] | None:
    return step_bf16(_cfg(config), tmp, log=run_log())


@task
def openvino_task(config: dict[str, Any], tmp: str) -> dict[str, Any] | None:
    return step_openvino(_cfg(config), tmp, log=run_log())


@task
def optimize_task(config: dict[str, Any], tmp: str) -> dict[str, Any]:
    return step_optimize(_cfg(config), tmp, log=run_log())


@task
def tensorrt_task(config: dict[str, Any], tmp: str) -> dict[str, Any]:
    return step_tensorrt(_cfg(config), tmp)


@task(**RETRY)
def publish_task(
    config: dict[str, Any],
    tmp: str,
    merge: dict[str, Any],
    onnx: dict[str, Any],
    parity: dict[str, Any],
    opt: dict[str, Any] | None,
    trt: dict[str, Any] | None,
    reduced: dict[str, Any] | None,
    ov: dict[str, Any] | None = None,
) -> ExportResult:
    return publish_export(
        _cfg(config), tmp, merge, onnx, parity, opt, trt, reduced=reduced, ov_rep=ov, log=run_log()
    )


@task(**RETRY)
def register_task(config: dict[str, Any], export_dir: str) -> dict[str, Any]:
    """The export as a registered MLflow model version (`export.register`)."""
    cfg = _cfg(config)
    return register_export(export_dir, cfg.register, cfg.tracking_uri, log=run_log())


@task
def publish_export_artifacts(result: ExportResult) -> None:
    m = json.loads((Path(result.out) / "manifest.json").read_text())
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
            f"# export: {'reused' if result.reused else 'built'} `{result.out}`\n\n"
            f"- manifest: `{result.out}/manifest.json` ({len(m['files'])} files hashed)\n"
            f"- base: `{m['base_model']}`, lora scale {m['lora_scale']}, precision {m['precision']}\n"
            f"- concepts learned: {', '.join(m.get('concepts') or []) or '-'}\n"
            + "".join(
                f"- OpenVINO {p}: image mean diff {c['mean_abs_diff']:.2e} (<= {c['mean_atol']:g}), "
                f"{'ok' if c['pass'] else 'failed: refused at run time'}\n"
                for p, c in ((m.get("openvino") or {}).get("checks") or {}).items()
            )
            + (
                f"- registered: `models:/{result.registered['name']}/{result.registered['version']}` "
                f"({result.registered['tracking_uri']})\n"
                if result.registered
                else ""
            )
        ),
        "FineStyle export summary",
    )


@flow(name="export_model", log_prints=True)
def export_model(config: dict[str, Any] | None = None) -> ExportResult:
    """Stage 3 as a flow; returns the export path and parity summary."""
    cfg = to_dict(_cfg(config or {}))
    result = reuse_task(cfg)
    if result is None:
        tmp = begin_task(cfg)
        try:
            merge = merge_task(cfg, tmp)
            onnx = onnx_task(cfg, tmp)
            parity = validate_task(cfg, tmp)
            reduced = bf16_task(cfg, tmp)
            opt = optimize_task(cfg, tmp) if cfg["optimize"] else None
            ov = openvino_task(cfg, tmp)
            trt = tensorrt_task(cfg, tmp) if cfg["format"] == "tensorrt" else None
            result = publish_task(cfg, tmp, merge, onnx, parity, opt, trt, reduced, ov)
        except BaseException:
            abort_export(tmp)
            raise
    if cfg["register"]:
        result.registered = register_task(cfg, result.out)
    publish_export_artifacts(result)
    return result
