"""What a run shows while it trains: sample grids on fixed prompts and seeds, and the loss plot."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finestyle.config import TrainConfig
from finestyle.core.env import cpu_has_bf16
from finestyle.core.sd import (
    denoiser,
    text_encoders,
)

SWAP_OBJECTS = ("a sneaker", "a teapot", "a bicycle", "an owl")


def default_sample_prompts(rows: list[dict[str, Any]], style: str) -> list[str]:
    """Concept swaps: objects absent from the references, in the style, plus one kept concept."""
    concepts = [
        r["concept"]
        for r in rows
        if r.get("concept")
        and r.get("concept") != "background"
        and r.get("method") not in ("full", "background")
    ]
    prompts = [f"{o}, in {style} style" for o in SWAP_OBJECTS[:3]]
    if concepts:
        prompts.append(f"{min(concepts, key=len)}, in {style} style")
    return prompts


@torch.no_grad()
def sample_grid(pipe: Any, prompts: list[str], steps: int, size: int | None, seed: int) -> Any:
    from PIL import Image, ImageDraw

    imgs = []
    for k, p in enumerate(prompts):
        g = torch.Generator(device="cpu").manual_seed(seed + k)
        out = pipe(p, num_inference_steps=steps, generator=g, height=size, width=size, output_type="pil")
        imgs.append(out.images[0])
    w, h = imgs[0].size
    grid = Image.new("RGB", (w * len(imgs), h + 14), "white")
    d = ImageDraw.Draw(grid)
    for k, (im, p) in enumerate(zip(imgs, prompts, strict=True)):
        grid.paste(im, (k * w, 14))
        d.text((k * w + 2, 1), p[: max(8, w // 6)], fill=(0, 0, 0))
    return grid


def plot_loss(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 10:
        k = max(5, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(range(k, len(losses) + 1), smooth, lw=1.6, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@contextlib.contextmanager
def frozen_in_fp32(unet: Any) -> Iterator[None]:
    """The frozen weights held in bf16 (`train.mixed_precision: bf16`) as fp32 for a while; the LoRA
    weights (fp32, trained) are untouched, and bf16 -> fp32 -> bf16 gives back the same bits."""
    low = [p for p in unet.parameters() if not p.requires_grad and p.dtype != torch.float32]
    dtypes = [p.dtype for p in low]
    for p in low:
        p.data = p.data.float()
    try:
        yield
    finally:
        for p, dt in zip(low, dtypes, strict=True):
            p.data = p.data.to(dt)


def write_samples(
    pipe: Any,
    prompts: list[str],
    cfg: TrainConfig,
    out: Path,
    step: int,
    device: torch.device,
    final: bool = False,
) -> Path:
    """The sample grid of the prompts at this step, written under OUT/samples; returns its path."""
    net = denoiser(pipe)
    was_training = net.training
    net.eval()
    pipe.vae.to(device)
    for _, enc in text_encoders(pipe):
        enc.to(device)
    low = net.dtype if net.dtype != torch.float32 else None
    emulated = low == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16()
    try:
        if emulated:  # previews in fp32: an emulated bf16 UNet samples ~30x slower on such CPUs
            with frozen_in_fp32(net):
                grid = sample_grid(pipe, prompts, cfg.sample_steps, cfg.sample_resolution, seed=cfg.seed)
        else:
            with torch.autocast(device.type, dtype=low, enabled=low is not None):  # low-precision UNet
                grid = sample_grid(pipe, prompts, cfg.sample_steps, cfg.sample_resolution, seed=cfg.seed)
    finally:
        pipe.vae.to("cpu")
        for _, enc in text_encoders(pipe):
            enc.to("cpu")
        if was_training:
            net.train()
    (out / "samples").mkdir(exist_ok=True)
    path = out / "samples" / (f"final-step-{step:07d}.png" if final else f"step-{step:07d}.png")
    grid.save(path)
    return path
