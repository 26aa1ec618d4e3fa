"""`finestyle bench styles`: many styles on one swappable export against one merged export per style."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finestyle.artifacts.styles import KV_UNET, load_base_kv, load_style
from finestyle.bench.common import bench_dataset, dir_bytes, median_interleaved
from finestyle.bench.serve import ServerProcess, load_level
from finestyle.config import ExportConfig, TrainConfig
from finestyle.core.env import cpu_name
from finestyle.core.kv import project_kv
from finestyle.core.onnxrt import ort_session
from finestyle.export.steps import run_export
from finestyle.export.swappable import run_swappable_export
from finestyle.runtime.generate import load_backend
from finestyle.train.loop import (
    run_train,
)


def bench_styles(
    n_styles: int = 4,
    model: str = "builtin:tiny-sd",
    requests: int = 48,
    steps: int = 4,
    concurrency: int = 8,
    time_limit: float = 60.0,
    rounds: int = 40,
    memory_only: bool = False,
) -> dict[str, Any]:
    """Many styles, one server: N adapters as one swappable export against one merged export.

    - UNet step: the shared graph with K/V inputs vs the merged UNet graph (onnxruntime, batch 2,
      interleaved medians), plus the per-request K/V projection;
    - serving at `concurrency`: every request in one style vs requests cycling through all styles
      (dynamic batching on, so mixed-style batches form);
    - disk: the swappable export with N styles vs N merged exports (one measured, times N);
    - memory: a `finestyle serve` process's resident memory after one request, on the swappable
      export and on one merged export (N merged servers: that, times N, computed).

    `memory_only` skips the timings and the load (for large models on a CPU, where they would take
    hours) and proves parity with one denoising step instead of four."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        ds = bench_dataset(f"{d}/ds", 64)
        adapters = []
        for i in range(n_styles):
            cfg = TrainConfig(
                dataset=ds,
                base=model,
                out=f"{d}/run{i}",
                steps=2,
                lr=1e-2,
                resolution=64,
                rank=8,
                samples=False,
                seed=i,
            )
            adapters.append(run_train(cfg, log=lambda m: None).adapter)
        names = [f"style{i}" for i in range(n_styles)]
        swx, merged = f"{d}/swappable", f"{d}/merged"
        parity_steps = 1 if memory_only else 4
        run_swappable_export(model, adapters, names, swx, parity_steps=parity_steps, log=lambda m: None)
        light = dict(check_bf16=False, check_openvino=False) if memory_only else {}
        run_export(
            ExportConfig(
                base=model, adapter=adapters[0], out=merged, device="cpu", parity_steps=parity_steps, **light
            ),
            log=lambda m: None,
        )
        out: dict[str, Any] = {
            "model": model,
            "styles": n_styles,
            "cpu": cpu_name(),
            "disk_swappable_bytes": dir_bytes(swx),
            "disk_one_style_bytes": dir_bytes(Path(swx) / "styles" / names[0]),
            "disk_one_merged_export_bytes": dir_bytes(merged),
        }
        out["disk_n_merged_bytes_computed"] = out["disk_one_merged_export_bytes"] * n_styles
        out["memory_swappable_server"] = _server_memory(swx, names[-1])
        out["memory_one_merged_server"] = _server_memory(merged, None)
        out["memory_n_merged_servers_rss_bytes_computed"] = (
            out["memory_one_merged_server"]["rss_bytes"] * n_styles
        )
        if not memory_only:
            out.update(_styles_unet_step(swx, merged, names[0], rounds))
            out.update(_styles_serving(swx, names, requests, steps, concurrency, time_limit))
    return out


def _server_memory(export: str, style: str | None) -> dict[str, Any]:
    """A `finestyle serve` process's memory after one request (1 step, 64 px): resident (VmRSS)
    and peak (VmHWM), from /proc."""
    import httpx

    with ServerProcess(export, ["--batching" if style else "--no-batching"]) as s:
        body: dict[str, Any] = {"prompt": "a red boat", "steps": 1, "width": 64, "height": 64}
        if style:
            body["style"] = style
        r = httpx.post(s.url + "/v1/generate", json=body, timeout=600)
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {r.text[:200]}")
        status = Path(f"/proc/{s.proc.pid}/status").read_text()
    fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
    return {"rss_bytes": int(fields["VmRSS"]) * 1024, "peak_rss_bytes": int(fields["VmHWM"]) * 1024}


def _styles_unet_step(swx: str, merged: str, style: str, rounds: int) -> dict[str, Any]:
    """The shared graph with K/V inputs vs the merged UNet, batch 2, interleaved medians."""
    import numpy as np

    be = load_backend(swx)
    layers = be.manifest["swappable"]["layers"]
    base_kv = load_base_kv(Path(swx))
    st = load_style(Path(swx), style, be.manifest)
    merged_sess = ort_session(Path(merged) / "onnx/unet/model.onnx")
    kv_sess = ort_session(Path(swx) / KV_UNET)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, be.latent_channels, be.native_size, be.native_size, generator=g)
    emb = torch.randn(2, 77, base_kv[f"{layers[0]}.to_k.weight"].shape[1], generator=g)
    kv = project_kv(emb, layers, base_kv, [st, st])
    t = np.array(500.0, np.float32)
    f_merged = {"sample": x.numpy(), "timestep": t, "encoder_hidden_states": emb.numpy()}
    f_kv = {"sample": x.numpy(), "timestep": t, **{f"kv_{i}": k.numpy() for i, k in enumerate(kv)}}
    med = median_interleaved(
        {
            "merged": lambda: merged_sess.run(None, f_merged),
            "kv_inputs": lambda: kv_sess.run(None, f_kv),
            "project_kv": lambda: project_kv(emb, layers, base_kv, [st, st]),
        },
        rounds,
    )
    return {
        "unet_step_merged_s": med["merged"],
        "unet_step_kv_s": med["kv_inputs"],
        "kv_step_vs_merged": med["kv_inputs"] / med["merged"],
        "project_kv_per_request_s": med["project_kv"],
    }


def _styles_serving(
    swx: str, names: list[str], requests: int, steps: int, concurrency: int, time_limit: float
) -> dict[str, Any]:
    """One style for every request vs requests cycling through the styles, at `concurrency`."""
    with ServerProcess(swx, ["--max-batch", "8", "--queue-size", "64"]) as s:
        load_level(s.url, 1, 2, steps, time_limit, styles=names[:1])  # warm-up
        single = load_level(s.url, concurrency, requests, steps, time_limit, styles=names[:1])
        mixed = load_level(s.url, concurrency, requests, steps, time_limit, styles=names)
        single2 = load_level(s.url, concurrency, requests, steps, time_limit, styles=names[:1])
    base_rate = (single["img_per_s"] + single2["img_per_s"]) / 2
    return {
        "serve_single_style": [single, single2],
        "serve_mixed_styles": mixed,
        "mixed_vs_single_throughput": mixed["img_per_s"] / base_rate if base_rate else float("nan"),
    }
