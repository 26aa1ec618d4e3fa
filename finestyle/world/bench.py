"""`finestyle world bench-unet`: world-sd's training step against the UNet shipped on 2026-12-05.

Each UNet is built from its config (random weights: the step's time does not depend on them) with
diffusers' default attention, and timed forward and backward at the training batch (32 latents of
4×16×16, 32 text tokens of 64), in fp32 and in bf16 autocast; a UNet's figure is its faster
precision, and the two run side by side in one process. bf16 is only meaningful on a CPU with bf16
units (AMX / AVX-512 BF16): elsewhere it is emulated, and fp32 wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from finestyle.core.env import cpu_flags, cpu_name
from finestyle.core.fs import read_json

SHIPPED_2026_12_05 = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(48, 96, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=16,
)
"""The world-sd UNet shipped on 2026-12-05 (4.3 M parameters; 4 heads of 12 dims, attention at 16×16)."""


def _unet_from(config: dict[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def current_config(folder: str | None = None) -> dict[str, Any]:
    """world-sd's UNet config: the given pipeline folder's (`unet/config.json`), else this version's design."""
    if folder:
        cfg = read_json(Path(folder) / "unet" / "config.json")
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    from .models import unet_model

    return {k: v for k, v in unet_model().config.items() if not k.startswith("_")}


def time_step(unet: Any, batch: int, bf16: bool, repeats: int) -> float:
    """Median seconds of one forward + backward (the loss's own cost is negligible)."""
    x = torch.randn(batch, 4, 16, 16)
    t = torch.randint(0, 1000, (batch,))
    c = torch.randn(batch, 32, unet.config.cross_attention_dim)
    times = []
    for i in range(repeats + 1):
        unet.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = unet(x, t, c).sample
        out.float().pow(2).mean().backward()
        if i:  # the first call pays one-off allocations
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_unet_step(
    folder: str | None = None,
    batch: int = 32,
    repeats: int = 5,
    threads: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Side-by-side step times of the 2026-12-05 UNet and world-sd's (best precision each) and their ratio."""
    if threads:
        torch.set_num_threads(threads)
    rows: dict[str, dict[str, float]] = {}
    for name, cfg in (("shipped-2026-12-05", SHIPPED_2026_12_05), ("world-sd", current_config(folder))):
        unet = _unet_from(cfg)
        rows[name] = {
            "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
            "fp32_s": time_step(unet, batch, False, repeats),
            "bf16_s": time_step(unet, batch, True, repeats),
        }
        rows[name]["best_s"] = min(rows[name]["fp32_s"], rows[name]["bf16_s"])
        r = rows[name]
        log(
            f"{name}: {r['params_m']:.2f} M params; fp32 {r['fp32_s'] * 1e3:.0f} ms, bf16 "
            f"{r['bf16_s'] * 1e3:.0f} ms a step (batch {batch})"
        )
    flags = cpu_flags()
    return {
        "cpu": cpu_name(),
        "bf16_units": any(f in flags for f in ("amx_bf16", "avx512_bf16")),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "rows": rows,
        "speedup": rows["shipped-2026-12-05"]["best_s"] / rows["world-sd"]["best_s"],
        "goal": 4.0,
    }
