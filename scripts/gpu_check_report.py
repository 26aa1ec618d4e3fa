"""Collect a `scripts/gpu-check.sh` run folder into results.json and results.md.

Usage: python scripts/gpu_check_report.py OUT_DIR. Exit 1 when a step failed or timed out.
Only the standard library: it must run whatever else is missing on the machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GOALS = {
    "train_peak_vram_gb": ("≤", 6.0),
    "sdxl_peak_vram_gb": ("≤", 12.0),
    "ort_vs_torch": ("≥", 1.5),
    "serve_batching_ratio": ("≥", 1.5),
}


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _export_figures(r: dict[str, Any]) -> dict[str, Any]:
    """One `bench export --bound` result: eager vs ORT (and TensorRT) step times and parity."""
    f = {"torch_eager_ms": r["torch_eager_s"] * 1e3, "dtype": r["dtype"], "ort": r["ort"]["status"]}
    if r["ort"]["status"] == "ran":
        f.update(ort_ms=r["ort"]["step_s"] * 1e3, ort_vs_torch=r["ort_vs_torch"])
        f["ort_max_abs_diff"] = r["ort"]["max_abs_diff_vs_torch"]
    f["trt"] = r["trt"]["status"]
    if r["trt"]["status"] == "ran":
        f.update(
            trt_ms=r["trt"]["step_s"] * 1e3,
            trt_engine_build_s=r["trt"]["session_and_first_run_s"],
            trt_max_abs_diff=r["trt"]["max_abs_diff_vs_torch"],
        )
    return f


def _figures(out: Path) -> dict[str, dict[str, Any]]:
    """Per step: the figures worth a line in the table."""
    fig: dict[str, dict[str, Any]] = {}
    train = _load(out / "bench-train.json")
    if train:
        base = train["results"].get(train.get("baseline", "baseline"), {})
        best = train["results"].get("cached-bf16") or next(iter(train["results"].values()))
        f = {
            "steps_per_s": best["steps_per_s"],
            "baseline_steps_per_s": base.get("steps_per_s"),
            "ratio_vs_baseline": best.get("ratio_vs_baseline"),
            "unet_tflops": best.get("unet_tflops"),
            "mfu": best.get("mfu"),
        }
        if "peak_vram_gib" in best:
            f["train_peak_vram_gb"] = best["peak_vram_gib"] * 2**30 / 1e9
            f["baseline_peak_vram_gb"] = base.get("peak_vram_gib", 0) * 2**30 / 1e9
        fig["bench-train"] = f
    for name in ("bench-export", "sdxl-export"):
        exp = _load(out / f"{name}.json")
        if exp:
            fig[name] = _export_figures(exp[0])

    manifest = _load(out / "export" / "manifest.json")
    if manifest:
        parity = manifest.get("parity", {})
        fig["export"] = {
            f"parity_{k}_max_abs_diff": v.get("max_abs_diff")
            for k, v in parity.items()
            if isinstance(v, dict)
        }
    serve = _load(out / "serve.json")
    if serve:
        on, off = serve["levels"]["on"][-1], serve["levels"]["off"][-1]
        fig["serve"] = {
            "concurrency": on.get("concurrency"),
            "img_per_s_batching_on": on["img_per_s"],
            "img_per_s_batching_off": off["img_per_s"],
            "serve_batching_ratio": serve["batching_ratio_at_max_concurrency"],
        }
    sdxl = _load(out / "sdxl.json")
    if sdxl:
        cached = sdxl["results"].get("cached-bf16") or next(iter(sdxl["results"].values()))
        fig["sdxl"] = {
            "steps_per_s": cached["steps_per_s"],
            "ratio_vs_baseline": cached["ratio_vs_baseline"],
            "peak_vram_gib": cached.get("peak_vram_gib"),
            "peak_rss_gib": cached["peak_rss_gib"],
        }
        if cached.get("peak_vram_gib") is not None:
            fig["sdxl_peak_vram_gb"] = cached["peak_vram_gib"] * 2**30 / 1e9
    return fig


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _goal_marks(figs: dict[str, Any]) -> list[str]:
    marks = []
    for key, (op, goal) in GOALS.items():
        if isinstance(figs.get(key), (int, float)):
            ok = figs[key] <= goal if op == "≤" else figs[key] >= goal
            marks.append(f"{key} {_fmt(figs[key])} (goal {op} {goal}) {'✓' if ok else '✗'}")
    return marks


def main(out: Path) -> int:
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    versions = _load(out / "versions.json") or {}
    figures = _figures(out)
    dry = versions.get("gpu") is None
    results = {"versions": versions, "steps": steps, "figures": figures, "goals": GOALS}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    card = versions.get("nvidia_smi") or versions.get("gpu") or f"no GPU (CPU: {versions.get('cpu', '?')})"
    lines = [
        "# GPU check" + (" (dry run on the CPU)" if dry else ""),
        "",
        f"- card: {card}",
        f"- torch {versions.get('torch')} (CUDA {versions.get('cuda')}), diffusers {versions.get('diffusers')}, "
        f"transformers {versions.get('transformers')}, onnxruntime {versions.get('onnxruntime-gpu') or versions.get('onnxruntime')} "
        f"{versions.get('ort_providers')}, TensorRT {versions.get('tensorrt-cu12') or versions.get('tensorrt')}",
        "",
        "| step | status | seconds | figures | goals |",
        "|---|---|---|---|---|",
    ]
    for s in steps:
        figs = figures.get(s["step"], {})
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in figs.items() if k not in GOALS)
        detail = s.get("detail", "")
        status = s["status"] if s["status"] != "skipped" else f"skipped: {detail}"
        lines.append(
            f"| {s['step']} | {status} | {s.get('seconds', 0):.0f} | {shown} | {'; '.join(_goal_marks(figs))} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    bad = [s["step"] for s in steps if s["status"] in ("failed", "timeout")]
    if bad:
        print(f"\nfailed or timed out: {', '.join(bad)} (logs: {out}/<step>.log)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/gpu_check_report.py OUT_DIR")
    sys.exit(main(Path(sys.argv[1])))
