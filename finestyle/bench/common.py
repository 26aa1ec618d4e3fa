"""What the benchmarks share: sample images and datasets, timers, worker processes, peaks and FLOP counts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from finestyle.config import PrepareConfig, TrainConfig
from finestyle.core.models import (
    BUILTINS,
    builtin_folder,
    is_builtin,
)
from finestyle.core.sd import (
    pack_cond,
    pooled_dim,
    unet_kwargs,
)
from finestyle.prepare.stage import run_prepare
from finestyle.train.loop import (
    add_lora,
)


def random_images(n: int, size: int = 384) -> list[Any]:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [
        Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())
        for _ in range(n)
    ]


def bench_images(folder: Any, n: int = 4, size: int = 256) -> Any:
    """`n` reproducible pictures (coloured shapes on a gradient): the benchmark needs no files of its own."""
    import random

    import numpy as np
    from PIL import Image, ImageDraw

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = random.Random(i)
        ramp = np.linspace(0, 1, size)[None, :, None] * np.array(rng.sample(range(60, 255), 3))[None, None]
        img = Image.fromarray(np.broadcast_to(ramp, (size, size, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(size // 8, size // 3)
            fill = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=fill)
        img.save(out / f"bench-{i}.png")
    return out


def bench_dataset(folder: str, resolution: int) -> str:
    images = bench_images(f"{folder}-images", size=max(resolution, 64))
    run_prepare(
        PrepareConfig(
            images=[str(images)],
            style="paper-cut",
            out=folder,
            concepts="none",
            resolution=resolution,
            num_beams=1,
        ),
        log=lambda m: None,
    )
    return folder


def meta_unet(base: str) -> tuple[Any, int]:
    """The base model's UNet with its parameters on the meta device (its shapes, no memory), and the
    VAE's downsampling factor."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if is_builtin(base) and not BUILTINS[base].folder:
        with init_empty_weights():
            comps = BUILTINS[base].build()
        return comps["unet"].to("meta"), 2 ** (len(comps["vae"].config.block_out_channels) - 1)
    folder = str(builtin_folder(base) if is_builtin(base) else base)
    cfg = UNet2DConditionModel.load_config(folder, subfolder="unet")
    vae_cfg = AutoencoderKL.load_config(folder, subfolder="vae")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg).to("meta")
    return unet, 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def unet_train_step_gflop(base: str, resolution: int, device: str = "cpu") -> float:
    """FLOPs of one UNet forward + backward with the K/V LoRA (what every variant runs per step), counted
    by torch's FLOP counter at `resolution` (VAE and text encoder excluded). The UNet runs on the meta
    device: shapes only, so SDXL's 2.6B UNet is counted without allocating it."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae_scale = meta_unet(base)
    unet.requires_grad_(False)
    add_lora(unet, TrainConfig(dataset="", base=base))
    unet.to("meta")
    side = resolution // vae_scale
    x = torch.randn(1, unet.config.in_channels, side, side, device="meta")
    c = torch.randn(1, 77, unet.config.cross_attention_dim, device="meta")
    pdim = pooled_dim(unet.config)
    if pdim:
        c = pack_cond(c, torch.randn(1, pdim, device="meta"))
    kw = unet_kwargs(unet.config, c, (resolution, resolution))
    with FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor([500], device="meta"), **kw).sample.float().pow(2).mean().backward()
    return fc.get_total_flops() / 1e9


# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, without sparsity), by device name.
GPU_BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


def gpu_bf16_peak_tflops(name: str) -> float | None:
    for key, peak in GPU_BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def run_worker(call: str, what: str) -> dict[str, Any]:
    """Run `call` (a finestyle.bench.suite function call returning JSON-able data) in a fresh
    process, so that its peak RSS and VRAM are its own; returns its result."""
    import json
    import os
    import subprocess
    import sys

    code = f"import json; from finestyle.bench import suite; print('RESULT' + json.dumps(suite.{call}))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    if p.returncode or not line:
        raise RuntimeError(f"bench {what} failed: {p.stderr[-2000:]}")
    return json.loads(line[0][6:])


def sync_device(dev: Any) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, n: int = 2048, iters: int = 5, repeats: int = 3) -> float:
    """GFLOP/s of a large square matrix product in `dtype` on this CPU (the reference peak): the best
    of `repeats` timings, so that a noisy neighbour does not lower the peak the shares divide by."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t) / 1e9)
    return best


def time_call(fn: Any, iters: int) -> float:
    return time_call_sync(fn, iters, torch.device("cpu"))


def time_call_sync(fn: Any, iters: int, dev: torch.device) -> float:
    fn()
    sync_device(dev)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync_device(dev)
    return (time.perf_counter() - t) / iters


def np_dtype(t: torch.Tensor) -> Any:
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[t.dtype]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_bytes(p: Any) -> int:

    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def median_interleaved(fns: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns round by round."""
    import statistics

    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
