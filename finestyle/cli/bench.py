"""`finestyle bench`: benchmarks that print a ratio against a baseline measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from finestyle.cli.base import bench_app, command
from finestyle.core.errors import UserError


@bench_app.command("caption")
@command
def bench_caption(
    captioner: str = typer.Option("builtin:blip-base-random", help="Captioner to measure."),
    images: int = typer.Option(16, help="Number of images."),
    batch_size: int = typer.Option(8, help="Batch size of the project's path."),
    max_new_tokens: int = typer.Option(20, help="Tokens generated per caption."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Captioning images/s: the project's batched path vs a one-at-a-time generate loop."""
    from finestyle.bench.suite import bench_caption as run

    r = run(captioner, images, batch_size, max_new_tokens)
    typer.echo(json.dumps(r, indent=2))
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


@bench_app.command("train")
@command
def bench_train_cmd(
    base: str = typer.Option("builtin:sd15-random", help="Model to train."),
    resolution: int = typer.Option(256, help="Training resolution."),
    steps: int = typer.Option(3, help="Measured steps per variant (after warm-up)."),
    warmup: int = typer.Option(1, help="Warm-up steps per variant."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto (CUDA: bf16 variants, peak VRAM, MFU)."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Checkpoint the UNet's activations in every variant."
    ),
    variants: Optional[str] = typer.Option(
        None,
        help="Comma-separated: baseline, baseline-bf16, cached, cached-bf16, cached-compiled, "
        "cached-bf16-compiled [CPU: baseline, cached, cached-bf16].",
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Trainer steps/s + peak memory vs a baseline that re-encodes VAE latents and text every step.

    SDXL bases run the bf16 variants only (their fp32 weights alone are 14 GB)."""
    from finestyle.bench.suite import bench_train

    known = ("baseline", "baseline-bf16", "cached", "cached-bf16", "cached-compiled", "cached-bf16-compiled")
    chosen = tuple(v.strip() for v in variants.split(",")) if variants else None
    if chosen and any(v not in known for v in chosen):
        raise UserError(f"--variants {variants!r}: use any of {', '.join(known)}")
    r = bench_train(
        base,
        resolution,
        steps,
        warmup,
        variants=chosen,
        device=device,
        gradient_checkpointing=gradient_checkpointing,
    )
    typer.echo(
        f"{r['base']} at {r['resolution']} px on {r['gpu'] or r['device']} ({r['cpu']})"
        + (", gradient checkpointing" if gradient_checkpointing else "")
    )
    for name, v in r["results"].items():
        mem = (
            f"peak VRAM {v['peak_vram_gib']:.2f} GiB"
            if "peak_vram_gib" in v
            else f"peak RSS {v['peak_rss_gib']:.2f} GiB"
        )
        of = "of the GPU's bf16 peak" if r["gpu"] else "of the CPU's measured matmul peak"
        mfu = f"  {100 * v['mfu']:.1f}% {of}" if v.get("mfu") is not None else ""
        ratio = f"{v['ratio_vs_baseline']:.2f}x" if v["ratio_vs_baseline"] is not None else "-"
        first = f"  first step {v['first_step_seconds']:.1f} s" if v.get("first_step_seconds") else ""
        typer.echo(
            f"{name:20s} {v['steps_per_s']:.3f} steps/s  {v['seconds_per_step']:.3f} s/step  {mem}  "
            f"UNet {v['unet_tflops']:.2f} TFLOP/s{mfu}  ratio {ratio}{first}"
        )
        if v.get("top_ops"):
            top = ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in v["top_ops"][:5])
            typer.echo(f"{'':20s} top ops (last step, self time): {top}")
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


@bench_app.command("stages")
@command
def bench_stages_cmd(
    base: str = typer.Option("builtin:sdxl-random", help="Text-to-image model."),
    resolution: int = typer.Option(512, help="Training resolution."),
    steps: int = typer.Option(2, help="Training steps (bf16)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Peak RSS and time of prepare, a few bf16 training steps and the export of every component but
    the UNet, each in its own process, next to the memory guard's estimates."""
    from finestyle.bench.suite import bench_stages

    r = bench_stages(base, resolution, steps)
    host = f"{r['host_memory_gib']:.1f} GiB" if r["host_memory_gib"] else "unknown"
    typer.echo(f"{r['base']} on {r['cpu']}, host memory {host}; parameters (M): {r['params_millions']}")
    for name, v in r["stages"].items():
        est = r["estimates_gib"].get(name if name != "export-parts" else "", None)
        guard = f"  (guard's estimate {est:.1f} GiB)" if est else ""
        typer.echo(f"{name:13s} {v['seconds']:8.1f} s  peak RSS {v['peak_rss_gib']:6.2f} GiB{guard}")
    if r["estimates_gib"]:
        typer.echo(f"full export: the guard's estimate {r['estimates_gib']['export']:.1f} GiB")
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


@bench_app.command("export")
@command
def bench_export_cmd(
    model: list[str] = typer.Option(["builtin:tiny-sd", "builtin:sd15-random"], help="Models (repeatable)."),
    latent: int = typer.Option(32, help="Latent side (32 = 256 px)."),
    batch: int = typer.Option(2, help="UNet batch (2 = one image with guidance)."),
    iters: int = typer.Option(3, help="Timed iterations per variant."),
    image_size: Optional[int] = typer.Option(
        None,
        help="CPU: side of the whole image timed on the default (auto) runtime and on onnxruntime fp32 "
        "[the model's native size: 512 for SD 1.5].",
    ),
    device: str = typer.Option(
        "cpu", help="cpu, cuda or auto. On CUDA: fp16 eager vs ORT CUDA (+ TensorRT)."
    ),
    bound: bool = typer.Option(
        False, help="On CPU too: the device path (eager vs ORT with IO binding) instead of the CPU analysis."
    ),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="CPU: also the NNCF int8 UNet on OpenVINO (quantized in the run: minutes on SD 1.5).",
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """One UNet step: PyTorch eager vs onnxruntime (the export), with the fp32 peak share and bf16."""
    from finestyle.bench.suite import bench_unet_step, bench_unet_step_device
    from finestyle.core.models import pick_device

    dev = str(pick_device(device))
    allr = []
    if dev != "cpu" or bound:
        for m in model:
            r = bench_unet_step_device(m, latent, batch, iters, dev)
            allr.append(r)
            line = f"{m} on {r['gpu'] or dev} ({r['dtype']}): {r['gflop_per_step']:.1f} GFLOP/step | "
            line += f"torch eager {r['torch_eager_s'] * 1e3:.2f} ms"
            for key, label in (("ort", "ORT"), ("trt", "ORT TensorRT")):
                h = r[key]
                if h["status"] == "ran":
                    line += (
                        f" | {label} {h['step_s'] * 1e3:.2f} ms ({r['torch_eager_s'] / h['step_s']:.2f}x, "
                        f"session {h['session_and_first_run_s']:.1f} s, max diff {h['max_abs_diff_vs_torch']:.1e})"
                    )
                else:
                    line += f" | {label} {h['status']}"
            typer.echo(line)
        if json_out:
            json_out.write_text(json.dumps(allr, indent=2))
        return
    for m in model:
        r = bench_unet_step(m, latent, batch, iters, image_size, int8)
        allr.append(r)
        typer.echo(
            f"{m}: one UNet step, batch {batch}, latent {latent}x{latent}, {r['gflop_per_step']:.1f} GFLOP | "
            f"{r['cpu']} | matmul peaks: fp32 {r['matmul_fp32_gflops']:.0f} GFLOP/s, bf16 "
            + (
                f"{r['matmul_bf16_gflops']:.0f} GFLOP/s"
                if r["matmul_bf16_gflops"]
                else "none (no bf16 units: bf16 rows run a slow fallback)"
            )
        )
        typer.echo(
            f"  {'runtime':<46} {'ms':>9} {'vs eager':>9} {'GFLOP/s':>8} {'of peak':>12} {'rel diff':>9}"
        )
        for row in r["runtimes"]:
            rel = f"{row['rel_diff']:.1e}" if row["rel_diff"] is not None else "-"
            typer.echo(
                f"  {row['runtime']:<46} {row['ms']:>9.1f} {row['vs_eager_fp32']:>8.2f}x "
                f"{row['gflops']:>8.0f} "
                + (f"{100 * row['share_of_peak']:>4.0f}%" if row["share_of_peak"] is not None else "    -")
                + f" {row['precision']:<5}"
                f"  {rel:>9}"
            )
        if r["openvino"] != "ran":
            typer.echo("  OpenVINO: not installed (pip install 'finestyle[cpu]')")
        else:
            t = {row["key"]: row["ms"] for row in r["runtimes"]}
            ovk = "openvino_bf16_s" if "openvino_bf16_s" in t else "openvino_fp32_s"
            typer.echo(
                f"  OpenVINO {ovk.split('_')[1]} vs PyTorch bf16: {t['torch_bf16_weights_s'] / t[ovk]:.2f}x | "
                f"vs onnxruntime fp32: {t['ort_fp32_s'] / t[ovk]:.2f}x"
            )
            for mode, key in (("hybrid", "openvino_int8_s"), ("full", "openvino_int8-full_s")):
                if key in t:
                    typer.echo(
                        f"  OpenVINO int8 {mode} vs OpenVINO {ovk.split('_')[1]}: {t[ovk] / t[key]:.2f}x "
                        "(its quality: the export's int8 guard, `export --quantize int8`)"
                    )
        w = r["whole_image"]
        typer.echo(
            f"  whole image ({w['size']} px, {w['steps']} steps, text encoder + UNet + VAE decode): the default "
            f"runtime, {w['runtime']}: {w['seconds']:.2f} s; onnxruntime fp32 {w['ort_fp32_seconds']:.2f} s "
            f"({w['auto_vs_ort_fp32']:.2f}x)"
        )
        echo_breakdowns(r)
    if json_out:
        json_out.write_text(json.dumps(allr, indent=2))


@bench_app.command("serve")
@command
def bench_serve_cmd(
    export_dir: Optional[str] = typer.Option(
        None, "--export", help="Export to serve [a fresh builtin export]."
    ),
    requests: int = typer.Option(64, help="Requests per concurrency level (bounded)."),
    steps: int = typer.Option(4, help="Denoising steps per request."),
    time_limit: float = typer.Option(60.0, help="Seconds per level at most."),
    size: Optional[int] = typer.Option(None, help="Image side in pixels [the model's native size]."),
    max_wait_ms: float = typer.Option(60.0, help="Server's batching wait (--max-wait-ms)."),
    runtime: str = typer.Option("onnxruntime", help="Server's runtime: onnxruntime | openvino | torch."),
    styles: int = typer.Option(
        0, help="N > 0: many styles, one server (N adapters as one swappable export vs merged)."
    ),
    model: str = typer.Option("builtin:tiny-sd", help="--styles: the base model."),
    concurrency: int = typer.Option(8, help="--styles: clients."),
    memory_only: bool = typer.Option(
        False, "--memory-only", help="--styles: disk and server memory only (no timings: for large models)."
    ),
    soak: float = typer.Option(
        0,
        help="S > 0: the soak instead: S seconds at --concurrency 4 (or as given), start-up warm-up off then "
        "on, each with an empty OpenVINO compile cache: errors, p95, shape compiles and resident memory.",
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Server under load on 127.0.0.1: concurrency 1/2/4/8, batching on vs off, then an overload flood."""
    from finestyle.bench.suite import bench_serve, bench_soak, bench_styles

    if soak > 0:
        conc = 4 if concurrency == 8 else concurrency  # --concurrency's default is the --styles one
        _print_soak(bench_soak(export_dir, runtime, soak, conc, steps), json_out)
        return
    if styles > 0:
        r = bench_styles(styles, model, requests, steps, concurrency, time_limit, memory_only=memory_only)
        _print_styles(r, json_out)
        return
    r = bench_serve(
        export_dir,
        requests_per_level=requests,
        steps=steps,
        time_limit=time_limit,
        size=size,
        max_wait_ms=max_wait_ms,
        runtime=runtime,
    )
    typer.echo("batching  conc  ok/req   errors  p50 s   p95 s   p99 s   img/s")
    for mode, rows in r["levels"].items():
        for x in rows:
            typer.echo(
                f"{mode:8s}  {x['concurrency']:4d}  {x['ok']:3d}/{x['requests']:<3d}  {x['errors']:6d}  "
                f"{x['p50_s']:.3f}  {x['p95_s']:.3f}  {x['p99_s']:.3f}  {x['img_per_s']:.2f}"
            )
    ratios = [
        f"c={on['concurrency']}: {on['img_per_s'] / off['img_per_s']:.2f}x"
        for on, off in zip(r["levels"]["on"], r["levels"]["off"], strict=True)
        if off["img_per_s"]
    ]
    typer.echo("batching on/off images/s: " + ", ".join(ratios))
    typer.echo(
        f"batching throughput ratio at the highest concurrency: {r['batching_ratio_at_max_concurrency']:.2f}x"
    )
    typer.echo(f"overload (queue 4, 24 concurrent): {r['overload']}")
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


def _print_soak(r: dict[str, Any], json_out: Path | None) -> None:
    mb = 2**20
    typer.echo(f"soak: {r['runtime']}, concurrency {r['concurrency']} | {r['cpu']}")
    typer.echo(
        "warm-up  ready s  ok/req     errors  p50 s   p95 s   p99 s   max s   compiles in load  "
        "RSS MiB (settled -> end)"
    )
    for mode, x in r["runs"].items():
        typer.echo(
            f"{mode:7s}  {x['start_to_ready_s']:7.1f}  {x['ok']:4d}/{x['requests']:<4d}  {x['errors']:6d}  "
            f"{x['p50_s']:.3f}  {x['p95_s']:.3f}  {x['p99_s']:.3f}  {x['max_s']:.3f}  "
            f"{x['shape_compiles_during_load']:16d}  "
            f"{x['rss_settled_bytes'] / mb:.0f} -> {x['rss_end_bytes'] / mb:.0f} ({x['rss_growth']:+.1%})"
        )
    if "p95_off_over_on" in r:
        typer.echo(
            f"without warm-up / with: p95 {r['p95_off_over_on']:.2f}x, p99 {r['p99_off_over_on']:.2f}x, "
            f"max {r['max_off_over_on']:.2f}x"
        )
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


def _print_styles(r: dict[str, Any], json_out: Path | None) -> None:
    mb, gb = 1e6, 2**30
    typer.echo(f"{r['model']}, {r['styles']} styles | {r['cpu']}")
    if "unet_step_kv_s" in r:
        typer.echo(
            f"  UNet step, batch 2 (interleaved medians): merged {r['unet_step_merged_s'] * 1e3:.2f} ms | "
            f"K/V inputs {r['unet_step_kv_s'] * 1e3:.2f} ms = {r['kv_step_vs_merged']:.3f}x the merged step "
            f"(goal <= 1.05x) | K/V projection once per request {r['project_kv_per_request_s'] * 1e3:.2f} ms"
        )
        s1, s2 = r["serve_single_style"]
        m = r["serve_mixed_styles"]
        typer.echo(
            f"  serving at concurrency {m['concurrency']}: one style {s1['img_per_s']:.2f} / {s2['img_per_s']:.2f} img/s "
            f"(before/after) | styles mixed {m['img_per_s']:.2f} img/s = {r['mixed_vs_single_throughput']:.2f}x "
            f"(goal >= 0.9x) | errors {s1['errors'] + s2['errors'] + m['errors']}"
        )
    typer.echo(
        f"  disk: swappable with {r['styles']} styles {r['disk_swappable_bytes'] / mb:.1f} MB (one style "
        f"{r['disk_one_style_bytes'] / 1e3:.1f} kB) | {r['styles']} merged exports "
        f"{r['disk_n_merged_bytes_computed'] / mb:.1f} MB (computed: one measured x {r['styles']})"
    )
    sw, one = r["memory_swappable_server"], r["memory_one_merged_server"]
    typer.echo(
        f"  server memory after one request (resident / peak): swappable with {r['styles']} styles "
        f"{sw['rss_bytes'] / gb:.2f} / {sw['peak_rss_bytes'] / gb:.2f} GiB | one merged export "
        f"{one['rss_bytes'] / gb:.2f} / {one['peak_rss_bytes'] / gb:.2f} GiB | {r['styles']} merged servers "
        f"{r['memory_n_merged_servers_rss_bytes_computed'] / gb:.2f} GiB resident (computed: one x {r['styles']})"
    )
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


def echo_breakdowns(r: dict) -> None:
    """Where the CPU runtimes' time goes: onnxruntime by op type, OpenVINO by layer type."""
    b = r["ort_breakdown"]
    typer.echo(
        f"  ORT fp32 by op: conv {b['conv_gflop']:.1f} GFLOP in {b['conv_ms']:.0f} ms "
        f"({100 * b['conv_share_of_peak']:.0f}% of peak) | matmul {b['matmul_gflop']:.1f} GFLOP in "
        f"{b['matmul_ms']:.0f} ms ({100 * b['matmul_share_of_peak']:.0f}%) | other ops "
        f"{b['other_ops_ms']:.0f} ms | ceiling with conv+matmul at 100% of peak: "
        f"{100 * b['ceiling_share_of_peak']:.0f}%"
    )
    if "openvino_breakdown" in r:
        b, o = r["openvino_breakdown"], r["openvino_ops"]
        typer.echo(
            f"  OpenVINO {r['openvino_profiled']} by layer: conv {b['conv_ms']:.0f} ms "
            f"({100 * b['conv_share_of_peak']:.0f}% of peak) | matmul {b['matmul_ms']:.0f} ms "
            f"({100 * b['matmul_share_of_peak']:.0f}%) | other layers {b['other_ops_ms']:.0f} ms | ceiling: "
            f"{100 * b['ceiling_share_of_peak']:.0f}%"
        )
        typer.echo(
            "  OpenVINO top layers: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in list(o["top10_ms"].items())[:5])
        )
