"""Benchmarks that print a ratio against a baseline measured side by side in the same run, one module
each (caption, train, export, device, serve, styles, stages); this module gathers them."""

from __future__ import annotations

from finestyle.bench.caption import bench_caption
from finestyle.bench.common import (
    GPU_BF16_PEAK_TFLOPS,
    gpu_bf16_peak_tflops,
    matmul_peak,
    meta_unet,
    run_worker,
    unet_train_step_gflop,
)
from finestyle.bench.device import bench_unet_step_device
from finestyle.bench.export import CPU_RUNTIMES, bench_unet_step, runtime_table
from finestyle.bench.serve import bench_serve, bench_soak
from finestyle.bench.stages import bench_stages, export_parts, pipeline_without_unet, stage_worker
from finestyle.bench.styles import bench_styles
from finestyle.bench.train import bench_train, train_worker

__all__ = [
    "CPU_RUNTIMES",
    "GPU_BF16_PEAK_TFLOPS",
    "bench_caption",
    "bench_serve",
    "bench_soak",
    "bench_stages",
    "bench_styles",
    "bench_train",
    "bench_unet_step",
    "bench_unet_step_device",
    "export_parts",
    "gpu_bf16_peak_tflops",
    "matmul_peak",
    "meta_unet",
    "pipeline_without_unet",
    "run_worker",
    "runtime_table",
    "stage_worker",
    "train_worker",
    "unet_train_step_gflop",
]
