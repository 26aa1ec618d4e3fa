"""Merge step: the adapter fused into the UNet, proven equal to the adapter UNet at several timesteps and
batch sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, adapter_info
from finestyle.core.errors import UserError, VerificationError
from finestyle.core.models import load_sd_pipeline
from finestyle.core.sd import (
    MMDIT,
    pack_cond,
    pipe_family,
    pooled_dim,
    unet_kwargs,
)

PARITY_TIMESTEPS = (999, 500, 1)


PARITY_BATCHES = (1, 2)


def unet_probe_inputs(
    unet: Any, batch: int, seed: int = 0, size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (sample, conditioning) for equivalence checks; for SDXL the conditioning rows also
    carry a pooled embedding (`core.sd.pack_cond`)."""
    g = torch.Generator().manual_seed(seed + batch)
    s = size or min(unet.config.sample_size, 32)  # keep checks cheap on big UNets
    x = torch.randn(batch, unet.config.in_channels, s, s, generator=g)
    c = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    pdim = pooled_dim(unet.config)
    if pdim:
        c = pack_cond(c, torch.randn(batch, pdim, generator=g))
    return x, c


def probe_size_hw(x: torch.Tensor) -> tuple[int, int]:
    """The image size the probe's SDXL time ids state (any fixed value works: both sides use it)."""
    return (x.shape[-2] * 8, x.shape[-1] * 8)


@torch.no_grad()
def unet_outputs(unet: Any, timesteps=PARITY_TIMESTEPS, batches=PARITY_BATCHES) -> dict[str, torch.Tensor]:
    out = {}
    for b in batches:
        x, c = unet_probe_inputs(unet, b)
        kw = unet_kwargs(unet.config, c.to(unet.device, unet.dtype), probe_size_hw(x))
        for t in timesteps:
            out[f"b{b}_t{t}"] = (
                unet(x.to(unet.device, unet.dtype), torch.tensor(t, device=unet.device), **kw)
                .sample.float()
                .cpu()
            )
    return out


def _probe(pipe: Any) -> tuple[str, Any, Any]:
    """(component name, denoiser, its fixed-input outputs): the UNet's at several timesteps, or an SD 3.x /
    FLUX.1 transformer's velocities at several noise levels (`export.mmdit.velocities`)."""
    family = pipe_family(pipe)
    if family in MMDIT:
        from finestyle.core.mmdit import velocities

        return "transformer", pipe.transformer, lambda net: velocities(net, family)
    return "unet", pipe.unet, unet_outputs


def merge_adapter(
    base: str, adapter: str | None, lora_scale: float, device: torch.device, atol: float
) -> tuple[Any, dict[str, Any]]:
    """Load base + adapter, fuse at `lora_scale`, unload, and prove merged == unmerged.

    The denoiser is the UNet, or the MMDiT transformer of SD 3.x / FLUX.1. Returns (merged pipeline in
    fp32, merge report). Raises VerificationError past `atol`.
    """

    pipe = load_sd_pipeline(base, device=device, dtype=torch.float32)
    if adapter is None:
        return pipe, {"adapter": None, "max_abs_diff": 0.0, "atol": atol}
    info = adapter_info(adapter)
    weight_name = info.get("weight_name", ADAPTER_WEIGHTS)
    if not (Path(adapter) / weight_name).exists():
        raise UserError(f"adapter {adapter!r} lacks {weight_name}")
    name, net, outputs = _probe(pipe)
    base_ref = outputs(net)
    pipe.load_lora_weights(adapter, weight_name=weight_name, adapter_name="finestyle")
    pipe.set_adapters(["finestyle"], adapter_weights=[lora_scale])
    ref = outputs(net)
    # the adapter's scale is already set on the adapter: fuse it as is
    pipe.fuse_lora(components=[name], lora_scale=1.0, adapter_names=["finestyle"])
    pipe.unload_lora_weights()
    label = "UNet" if name == "unet" else "transformer"
    leftover = [k for k in net.state_dict() if "base_layer" in k or "lora_" in k]
    if leftover:
        raise VerificationError(f"merged {label} still holds peft wrapper weights, e.g. {leftover[0]}")
    merged = outputs(net)
    diff = max(float((merged[k] - ref[k]).abs().max()) for k in ref)
    effect = max(float((ref[k] - base_ref[k]).abs().max()) for k in ref)
    if not diff <= atol:
        raise VerificationError(
            f"merged {label} differs from {label}+adapter by {diff:.3g} max abs (> {atol:g}); "
            "the fuse did not reproduce the adapter"
        )
    return pipe, {
        "adapter": str(adapter),
        "max_abs_diff": diff,
        "atol": atol,
        "adapter_effect": effect,
        "checked": sorted(ref),
        "lora_scale": lora_scale,
    }


def release_memory() -> None:
    """Free what a step dropped before the next one loads its models: collect reference cycles
    (diffusers/peft modules hold some), then hand freed heap pages back to the OS (glibc keeps them
    otherwise, and an SD1.5 export's steps would stack on each other's leftovers)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
