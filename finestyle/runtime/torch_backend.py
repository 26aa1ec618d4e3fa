"""The PyTorch backend: a diffusers pipeline with its adapter, for checks and for models not yet exported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, adapter_info
from finestyle.artifacts.manifest import verify_export
from finestyle.core.fs import sha256_file
from finestyle.core.loading import require_unet
from finestyle.core.models import load_sd_pipeline, quiet_hf_logs
from finestyle.core.sd import (
    SDXL,
    encode_texts,
    pack_cond,
    pipe_family,
    unet_kwargs,
)
from finestyle.runtime.backend import Backend


def torch_backend_from_pipe(pipe: Any) -> Backend:
    """A torch backend over a pipeline already in memory (e.g. a merged model being checked)."""
    return build_torch_backend(pipe, {}, None, None, False)


def torch_backend(model: str, adapter: str | None, device: str | None, dtype: str | None = None) -> Backend:

    path = Path(model)
    manifest, msha = {}, None
    base_for_style: str | None = None
    if (path / "manifest.json").exists():
        manifest = verify_export(path)
        msha = sha256_file(path / "manifest.json")
        pipe = load_sd_pipeline(str(path / "merged"), device=device, dtype=dtype)
        base_for_style = manifest.get("base_model")
    else:
        require_unet("generate", model)
        pipe = load_sd_pipeline(model, device=device, dtype=dtype)
    has_adapter = False
    if adapter:
        info = adapter_info(adapter)
        with quiet_hf_logs():
            pipe.load_lora_weights(
                adapter, weight_name=info.get("weight_name", ADAPTER_WEIGHTS), adapter_name="finestyle"
            )
        has_adapter = True
    return build_torch_backend(pipe, manifest, msha, base_for_style, has_adapter)


def build_torch_backend(
    pipe: Any, manifest: dict[str, Any], msha: str | None, base_for_style: str | None, has_adapter: bool
) -> Backend:
    dev, dt = pipe.unet.device, pipe.unet.dtype
    fmt = torch.contiguous_format
    if dev.type == "cpu" and dt == torch.bfloat16:
        # The CPU reduced-precision path: bf16 weights in channels_last let oneDNN use AMX/AVX512-BF16
        # convolutions; measured 3.4x an fp32 eager UNet step on SD 1.5 (README, bench export).
        fmt = torch.channels_last
        pipe.unet.to(memory_format=fmt)

    vae_scale = pipe.vae_scale_factor

    def cond_kw(unet: Any, lat: torch.Tensor, emb: torch.Tensor) -> dict[str, Any]:
        size_hw = (lat.shape[-2] * vae_scale, lat.shape[-1] * vae_scale)
        return unet_kwargs(unet.config, emb.to(dev, dt), size_hw)

    @torch.no_grad()
    def unet_fn(lat: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return (
            pipe.unet(
                lat.to(dev, dt).contiguous(memory_format=fmt), t.to(dev), **cond_kw(pipe.unet, lat, emb)
            )
            .sample.float()
            .cpu()
        )

    base_fn = None
    if has_adapter:

        @torch.no_grad()
        def base_fn(lat: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            pipe.disable_lora()  # the base model = the same UNet with the adapter switched off
            try:
                return unet_fn(lat, t, emb)
            finally:
                pipe.enable_lora()
    elif base_for_style:
        state: dict[str, Any] = {}

        @torch.no_grad()
        def base_fn(lat: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            if "unet" not in state:  # loaded on first use: style guidance is opt-in
                state["unet"] = load_sd_pipeline(base_for_style, device=dev, dtype=dt).unet
            u = state["unet"]
            return u(lat.to(dev, dt), t.to(dev), **cond_kw(u, lat, emb)).sample.float().cpu()

    @torch.no_grad()
    def enc(ids: torch.Tensor) -> torch.Tensor:
        return pipe.text_encoder(ids.to(dev))[0].float().cpu()

    family = pipe_family(pipe)
    zero_negative = family == SDXL and bool(pipe.config.get("force_zeros_for_empty_prompt", False))

    @torch.no_grad()
    def enc_prompts(texts: list[str], negative: bool) -> torch.Tensor:
        hidden, pooled = encode_texts(pipe, texts, dev)
        cond = pack_cond(hidden, pooled).float().cpu()
        if negative and zero_negative:
            # SDXL pipelines use zeros, not the encoded "", for an empty negative prompt
            cond[[k for k, t in enumerate(texts) if not t]] = 0.0
        return cond

    @torch.no_grad()
    def dec(z: torch.Tensor) -> torch.Tensor:
        return pipe.vae.decode(z.to(dev, pipe.vae.dtype)).sample.float().cpu()

    return Backend(
        name=f"torch[{dev.type},{str(pipe.unet.dtype).removeprefix('torch.')}]",
        tokenizer=pipe.tokenizer,
        scheduler_config={**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__},
        scaling_factor=pipe.vae.config.scaling_factor,
        vae_scale=pipe.vae_scale_factor,
        latent_channels=pipe.unet.config.in_channels,
        native_size=pipe.unet.config.sample_size,
        encode_text=enc,
        unet=unet_fn,
        unet_base=base_fn,
        decode=dec,
        manifest=manifest,
        manifest_sha256=msha,
        family=family,
        encode_prompts=enc_prompts if family == SDXL else None,
    )


def mmdit_torch_backend(model: str, adapter: str | None, device: str | None, dtype: str | None) -> Backend:
    """SD 3.x / FLUX.1 on torch: diffusers' pipeline, with the adapter as a peft adapter so that style
    guidance's base pass is the same transformer with the adapter switched off."""
    path = Path(model)
    manifest, msha = {}, None
    if (path / "manifest.json").exists():
        manifest = verify_export(path)
        msha = sha256_file(path / "manifest.json")
        model = str(path / "merged")
    pipe = load_sd_pipeline(model, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if adapter:
        info = adapter_info(adapter)
        with quiet_hf_logs():
            pipe.load_lora_weights(
                adapter, weight_name=info.get("weight_name", ADAPTER_WEIGHTS), adapter_name="finestyle"
            )
    return Backend(
        name=f"torch ({pipe.transformer.device.type}, {str(pipe.transformer.dtype).removeprefix('torch.')}, diffusers {type(pipe).__name__})",
        tokenizer=pipe.tokenizer,
        scheduler_config=dict(pipe.scheduler.config),
        scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_scale=int(pipe.vae_scale_factor),
        latent_channels=int(pipe.vae.config.latent_channels),
        native_size=int(pipe.default_sample_size),
        encode_text=None,
        unet=None,
        decode=None,
        manifest=manifest,
        manifest_sha256=msha,
        parts={"pipe": pipe, "adapter": bool(adapter)},
        family=pipe_family(pipe),
    )


class StyleGuided:
    """Style guidance λ1 inside a diffusers SD 3.x / FLUX.1 pipeline, with the pipeline's own loop.

    The pipeline combines what the transformer returns as u + s·(c − u) under classifier-free
    guidance (scale s > 1), or takes c alone. Returning c' = c + (λ1 / s)·(c − b), where b is the
    base transformer's velocity for the prompt (the adapter switched off), makes its result
    u + s·(c − u) + λ1·(c − b): FineStyle's formula with velocities (docs/guides/sd3-flux.md)."""

    def __init__(self, pipe: Any, lam1: float, cfg_scale: float | None) -> None:
        self.pipe, self.lam1, self.s = pipe, lam1, cfg_scale
        self.net = pipe.transformer
        self.forward = self.net.forward

    def __enter__(self) -> StyleGuided:
        self.net.forward = self._forward
        return self

    def __exit__(self, *exc: Any) -> None:
        self.net.forward = self.forward

    def _forward(self, *args: Any, **kw: Any) -> Any:
        out = self.forward(*args, **kw)
        pred = out[0]
        n = pred.shape[0]
        half = n // 2 if self.s else 0  # with CFG the batch is [negative; prompt]
        base_kw = {
            k: (
                v[half:]
                if torch.is_tensor(v) and v.shape[:1] == (n,) and k not in ("img_ids", "txt_ids")
                else v
            )
            for k, v in kw.items()
        }
        self.net.disable_adapters()
        try:
            base = self.forward(*args, **base_kw)[0]
        finally:
            self.net.enable_adapters()
        cond = pred[half:]
        guided = cond + (self.lam1 / (self.s or 1.0)) * (cond - base)
        pred = torch.cat([pred[:half], guided]) if half else guided
        return (pred, *out[1:]) if isinstance(out, tuple) else type(out)(sample=pred)
