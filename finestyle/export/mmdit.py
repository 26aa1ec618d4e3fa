"""`finestyle export` for SD 3.x and FLUX.1: merge the text-stream adapter into the transformer and
prove it, export ONNX through optimum's SD3 / FLUX configs, and prove the ONNX against PyTorch.

1. merge: the adapter is fused into the transformer; the fused transformer's velocity on fixed inputs
   (two sigmas, batch 1 and 2) must equal the transformer + adapter's within `merge_atol`.
2. ONNX: optimum's exporter on the merged folder (text encoders, T5 included, transformer, VAE).
3. parity: the ONNX transformer against PyTorch on the same inputs (`unet_atol`), and a whole image by
   optimum's `ORTStableDiffusion3Pipeline` / `ORTFluxPipeline` against diffusers' pipeline, same
   latents and scheduler (`image_atol`).

bf16, OpenVINO, the graph optimizer, TensorRT, the base transformer beside the merged one and
swappable styles are not yet built for these families: the export says so, and serves on onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, adapter_info
from finestyle.core.errors import UserError, VerificationError
from finestyle.core.loading import load_sd_pipeline
from finestyle.core.sd import FLUX, SD3, pipe_family

NOT_YET = ("optimize", "with_base_unet", "fp16")


def check_options(cfg: Any) -> list[str]:
    """Refuse options not yet built for MMDiT exports; return the checks that will be skipped."""
    asked = [o for o in NOT_YET if getattr(cfg, o)]
    if cfg.format == "tensorrt":
        asked.append("format=tensorrt")
    if asked:
        raise UserError(
            f"export: {', '.join(asked)} is not yet built for SD 3.x / FLUX.1 exports; leave it off "
            "(docs/guides/sd3-flux.md)"
        )
    return [c for c in ("check_bf16", "check_openvino") if getattr(cfg, c)]


def _inputs(net: Any, family: str, batch: int, sigma: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed transformer inputs as the pipelines build them (8x8 latents, 7 text tokens)."""
    g = torch.Generator().manual_seed(seed + batch)
    cfg = net.config
    text = torch.randn(batch, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    if family == SD3:
        x = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
        return dict(
            hidden_states=x,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=torch.full((batch,), sigma * 1000),
        )
    x = torch.randn(batch, 16, cfg.in_channels, generator=g)  # 4x4 packed patches
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    out = dict(
        hidden_states=x,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=torch.full((batch,), sigma),
        img_ids=img_ids,
        txt_ids=torch.zeros(7, 3),
    )
    if cfg.guidance_embeds:
        out["guidance"] = torch.full((batch,), 3.5)
    return out


CASES = ((1, 0.3), (2, 0.8))


@torch.no_grad()
def velocities(net: Any, family: str) -> dict[str, torch.Tensor]:
    return {f"b{b}_s{s}": net(**_inputs(net, family, b, s)).sample.float() for b, s in CASES}


def merge_mmdit(base: str, adapter: str | None, lora_scale: float, atol: float) -> tuple[Any, dict[str, Any]]:
    """Base + adapter fused at `lora_scale`, proven equal to the unfused transformer + adapter."""
    pipe = load_sd_pipeline(base, device="cpu", dtype=torch.float32)
    family = pipe_family(pipe)
    if adapter is None:
        return pipe, {"adapter": None, "max_abs_diff": 0.0, "atol": atol}
    weight_name = adapter_info(adapter).get("weight_name", ADAPTER_WEIGHTS)
    if not (Path(adapter) / weight_name).exists():
        raise UserError(f"adapter {adapter!r} lacks {weight_name}")
    before = velocities(pipe.transformer, family)
    pipe.load_lora_weights(adapter, weight_name=weight_name, adapter_name="finestyle")
    pipe.set_adapters(["finestyle"], adapter_weights=[lora_scale])
    ref = velocities(pipe.transformer, family)
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=["finestyle"])
    pipe.unload_lora_weights()
    leftover = [k for k in pipe.transformer.state_dict() if "base_layer" in k or "lora_" in k]
    if leftover:
        raise VerificationError(f"merged transformer still holds peft wrapper weights, e.g. {leftover[0]}")
    merged = velocities(pipe.transformer, family)
    diff = max(float((merged[k] - ref[k]).abs().max()) for k in ref)
    if not diff <= atol:
        raise VerificationError(
            f"merged transformer differs from transformer+adapter by {diff:.3g} max abs (> {atol:g})"
        )
    effect = max(float((ref[k] - before[k]).abs().max()) for k in ref)
    return pipe, {
        "adapter": str(adapter),
        "max_abs_diff": diff,
        "atol": atol,
        "adapter_effect": effect,
        "checked": sorted(ref),
        "lora_scale": lora_scale,
    }


def transformer_parity(
    net: Any, family: str, onnx_path: Path, atol: float, providers: list[str]
) -> dict[str, Any]:
    """The ONNX transformer against PyTorch on the fixed inputs; fails past `atol`."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=providers)
    types = {i.name: i.type for i in sess.get_inputs()}
    diff = 0.0
    for b, s in CASES:
        inputs = _inputs(net, family, b, s)
        with torch.no_grad():
            ref = net(**inputs).sample.float().numpy()
        if family == FLUX:
            inputs.pop("guidance", None) if "guidance" not in types else None
        feeds = {
            k: v.numpy().astype(np.int64 if types[k] == "tensor(int64)" else np.float32)
            for k, v in inputs.items()
            if k in types
        }
        got = sess.run(None, feeds)[0]
        diff = max(diff, float(np.abs(got - ref).max()))
    if not diff <= atol:
        raise VerificationError(f"ONNX transformer differs from PyTorch by {diff:.3g} max abs (> {atol:g})")
    return {"max_abs_diff": diff, "atol": atol, "checked": [f"b{b}_s{s}" for b, s in CASES]}


def mmdit_image_parity(
    merged: Any, onnx_dir: Path, steps: int, atol: float, providers: list[str], size: int = 64
) -> dict[str, Any]:
    """A whole image by optimum's ORT pipeline and by diffusers' pipeline, same latents, same scheduler."""
    from optimum.onnxruntime import ORTFluxPipeline, ORTStableDiffusion3Pipeline

    family = pipe_family(merged)
    ort_cls = ORTStableDiffusion3Pipeline if family == SD3 else ORTFluxPipeline
    ort_pipe = ort_cls.from_pretrained(str(onnx_dir), provider=providers[0])
    ort_pipe.set_progress_bar_config(disable=True)
    prompt = "a lighthouse on a cliff at night"
    kw = dict(num_inference_steps=steps, height=size, width=size, output_type="np")
    if family == SD3:
        kw["guidance_scale"] = 7.0
    a = merged(prompt, generator=torch.Generator().manual_seed(1234), **kw).images[0]
    b = ort_pipe(prompt, generator=torch.Generator().manual_seed(1234), **kw).images[0]
    if not np.isfinite(b).all():
        raise VerificationError("ONNX pipeline image holds NaN/inf")
    diff = float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())
    if not diff <= atol:
        raise VerificationError(
            f"ONNX image differs from PyTorch by {diff:.3g} max abs (> {atol:g}) at {steps} steps"
        )
    return {"max_abs_diff": diff, "atol": atol, "steps": steps, "size": size, "prompt": prompt}
