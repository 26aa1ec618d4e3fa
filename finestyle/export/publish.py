"""An export's life: its cache key and versions, reuse, the temporary folder it is built in, and the
manifest-last publish.
"""

from __future__ import annotations

import json
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finestyle import __version__
from finestyle.artifacts.manifest import MANIFEST, verify_export
from finestyle.config import ExportConfig, keyed_fields, to_dict
from finestyle.core.errors import UserError
from finestyle.core.fs import (
    check_free_space,
    clean_stale_temps,
    hash_json,
    hash_tree,
    publish_dir,
    write_json,
)
from finestyle.core.memory import check_fits, component_params
from finestyle.core.models import model_fingerprint
from finestyle.core.onnxrt import require_tensorrt
from finestyle.core.sd import (
    folder_family,
)
from finestyle.core.stage import find_reusable
from finestyle.export.parity import FP16_IMAGE_ATOL, FP16_UNET_ATOL


def log_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class ExportResult:
    """What an export made: its folder and the parity it proved (as text); for a swappable export,
    its styles, and the style an --add-style or --remove-style changed."""

    out: str
    parity: dict[str, str] = field(default_factory=dict)
    cache_key: str = ""
    reused: bool = False
    styles: list[str] = field(default_factory=list)
    added: str | None = None
    removed: str | None = None
    registered: dict[str, Any] | None = None  # MLflow's name, version, run id (`--register`)


def export_cache_key(cfg: ExportConfig) -> str:

    conf = keyed_fields(cfg)
    adapter = None
    if cfg.adapter:
        ap = Path(cfg.adapter)
        adapter = hash_tree(ap) if ap.is_dir() else cfg.adapter
    return hash_json(
        {"stage": "export", "v": 1, "base": model_fingerprint(cfg.base), "adapter": adapter, "config": conf}
    )


def export_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import optimum
    import transformers

    return {
        "finestyle": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "optimum": getattr(optimum, "__version__", "?"),
    }


def check_reuse(cfg: ExportConfig, log=log_line) -> ExportResult | None:
    """An existing, verified export with the same content key, or None."""
    out = Path(cfg.out)
    if cfg.adapter and not Path(cfg.adapter).is_dir():
        raise UserError(
            f"adapter folder {cfg.adapter!r} does not exist; pass RUN/adapter from `finestyle train`"
        )
    if cfg.format == "tensorrt":
        require_tensorrt()
    key = export_cache_key(cfg)
    old = find_reusable(
        out,
        MANIFEST,
        key,
        stage="export",
        same="base, adapter and options",
        force=cfg.force,
        load=verify_export,
        log=log,
    )
    if old is None:
        return None
    return ExportResult(out=str(out), reused=True, parity=parity_summary(old["parity"]), cache_key=key)


def export_disk_bytes(cfg: ExportConfig, params: dict[str, int]) -> int:
    """The disk an export needs, from the model's parameter counts: `merged/` and `onnx/` in fp32, plus
    the base UNet (`--with-base-unet`), the optimizer's second UNet while it runs (`--optimize`) and the
    fp16 graphs (`--fp16`); 5% and 16 MB over that for configs, tokenizers and the manifest. Measured
    against SD 1.5 with --optimize --with-base-unet: 12 GB written, 16 GB asked."""
    total = 4 * sum(params.values())
    unet = 4 * params.get("unet", 0)
    need = 2 * total + unet * (int(cfg.with_base_unet) + int(cfg.optimize)) + (total // 2 if cfg.fp16 else 0)
    return int(need * 1.05) + 2**24


def begin_export(cfg: ExportConfig) -> str:
    """Create the temporary sibling folder the export is built in (published by `publish_export`).

    First refuses, with one line, a model whose export clearly cannot fit in this machine's memory, or
    on the disk it is written to."""
    check_fits(
        "export",
        cfg.base,
        "the ONNX export runs in fp32 whatever the final precision; run it on a machine with more memory",
    )
    out = Path(cfg.out).absolute()
    params = component_params(cfg.base)
    if params:
        check_free_space(
            "export",
            out.parent,
            export_disk_bytes(cfg, params),
            "free space there or export to another disk (--out); nothing was written",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out.parent, out.name)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return str(tmp)


def abort_export(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def export_thresholds(cfg: ExportConfig) -> tuple[float, float]:
    return (FP16_UNET_ATOL if cfg.fp16 else cfg.unet_atol, FP16_IMAGE_ATOL if cfg.fp16 else cfg.image_atol)


def publish_export(
    cfg: ExportConfig,
    tmp: str,
    merge_rep: dict[str, Any],
    onnx_rep: dict[str, Any],
    parity: dict[str, Any],
    opt_rep: dict[str, Any] | None,
    trt_rep: dict[str, Any] | None,
    log=log_line,
    reduced: dict[str, Any] | None = None,
    ov_rep: dict[str, Any] | None = None,
) -> ExportResult:
    """6. Write manifest.json last (sha256 of every file), then rename the folder into place."""
    unet_atol, image_atol = export_thresholds(cfg)
    parity = dict(parity)
    if opt_rep:
        parity.update(opt_rep.pop("parity"))
    info = json.loads((Path(cfg.adapter) / "finestyle_adapter.json").read_text()) if cfg.adapter else {}
    key = export_cache_key(cfg)
    manifest = {
        "format": "finestyle-export",
        "version": 1,
        "cache_key": key,
        "base_model": cfg.base,
        "adapter": cfg.adapter,
        "adapter_fingerprint": hash_json(hash_tree(cfg.adapter)) if cfg.adapter else None,
        "lora_scale": cfg.lora_scale,
        "options": to_dict(cfg),
        "merge": merge_rep,
        "onnx_checker": onnx_rep["checker"],
        "parity": parity,
        "thresholds": {"merge_atol": cfg.merge_atol, "unet_atol": unet_atol, "image_atol": image_atol},
        "optimize": opt_rep,
        "tensorrt": trt_rep,
        "has_base_unet": cfg.with_base_unet,
        "cpu_bf16": reduced,
        "openvino": ov_rep,
        "family": folder_family(Path(tmp) / "merged"),
        "eval": adapter_eval(cfg.adapter),
        "style": info.get("style"),
        "concepts": info.get("concepts", []),
        "precision": "fp16" if cfg.fp16 else "fp32",
        "fp16": onnx_rep.get("fp16"),
        "versions": export_versions(),
        "files": hash_tree(tmp, exclude=("manifest.json",)),
    }
    write_json(Path(tmp) / "manifest.json", manifest)
    publish_dir(Path(tmp), Path(cfg.out).absolute())
    log(f"export: {cfg.out} verified and published")
    summary = parity_summary(parity)
    for prec, chk in ((ov_rep or {}).get("checks") or {}).items():
        summary[f"openvino {prec}"] = f"{chk['mean_abs_diff']:.2e} mean (<= {chk['mean_atol']:g})" + (
            "" if chk["pass"] else ": FAILED, marked unusable"
        )
    return ExportResult(out=str(cfg.out), parity=summary, cache_key=key)


def adapter_eval(adapter: str | None) -> dict[str, Any] | None:
    """The evaluation the adapter's training run recorded (`train --eval-every`), for the manifest:
    the step adapter/ holds, how it was chosen, and its style, prompt and leakage figures."""
    if not adapter:
        return None
    report = Path(adapter).parent / "report.json"
    try:
        sel = json.loads(report.read_text()).get("selection") if report.is_file() else None
    except ValueError:
        return None
    if not sel:
        return None
    return {
        "source": "train --eval-every",
        "step": sel["step"],
        "select": sel["mode"],
        "judge": sel["judge"],
        **sel["figures"],
    }


def parity_summary(parity: dict[str, Any]) -> dict[str, str]:
    return {k: f"{v['max_abs_diff']:.2e} (<= {v['atol']:g})" for k, v in parity.items()}


def copy_adapter_info(adapter: str | None, dest: Path) -> None:
    if adapter and (Path(adapter) / "finestyle_adapter.json").exists():
        shutil.copy2(Path(adapter) / "finestyle_adapter.json", dest / "finestyle_adapter.json")
