"""One optimizer step: the diffusion loss and target, micro-batches with gradient accumulation, precision."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from finestyle.config import TrainConfig
from finestyle.core.env import cpu_has_bf16
from finestyle.core.errors import UserError
from finestyle.core.sd import (
    MMDIT,
    unet_kwargs,
    unpack_cond,
)
from finestyle.train.checkpoints import latest_checkpoint
from finestyle.train.data import Example, epoch_batches
from finestyle.train.state import TrainingDiverged, TrainState


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: Any,
    snr_gamma: float | None,
) -> torch.Tensor:
    """Noise-prediction MSE, optionally Min-SNR weighted (Hang et al. 2023, arXiv:2303.09556)."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = weights / snr if scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (loss * weights).mean()


def diffusion_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    pt = scheduler.config.prediction_type
    if pt == "epsilon":
        return noise
    if pt == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise UserError(f"scheduler prediction_type {pt!r} is not supported; use epsilon or v_prediction")


def train_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    mp = cfg.mixed_precision
    if mp == "auto":
        if device.type == "cpu":  # bf16 where the CPU multiplies it natively (AMX / AVX-512 BF16)
            return torch.bfloat16 if cpu_has_bf16() else None
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]


def _next_batch(st: TrainState) -> list[Example]:
    """This rank's next batch: every rank walks the same order and keeps its own slot."""
    batch: list[Example] = []
    for r in range(st.world):
        if st.pos >= len(st.batches):
            st.epoch, st.pos = st.epoch + 1, 0
            st.batches = epoch_batches(
                st.examples, st.cfg.batch_size, st.cfg.seed, st.epoch, st.cfg.whole_image_weight
            )
        if r == st.rank:
            batch = [st.examples[i] for i in st.batches[st.pos]]
        st.pos += 1
    return batch


def _micro_step(st: TrainState, batch: list[Example]) -> torch.Tensor:
    """One forward/backward on one batch from the caches; returns its (accumulation-scaled) loss, on
    the device (reading it would wait for the device: `train_step` reads once per step)."""
    if st.family in MMDIT:
        return _flow_micro_step(st, batch)
    cfg, gen, device = st.cfg, st.gen, st.device
    # inputs from the caches: sample the posterior, drop captions, draw noise and timesteps
    latents, cond = _cached_inputs(st, batch)
    noise = torch.randn(latents.shape, generator=gen)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
    t = torch.randint(0, st.noise_sched.config.num_train_timesteps, (len(batch),), generator=gen)
    latents, noise, t, cond = latents.to(device), noise.to(device), t.to(device), cond.to(device)
    noisy = st.noise_sched.add_noise(latents, noise, t)
    target = diffusion_target(st.noise_sched, latents, noise, t)
    tids = torch.tensor([ex.time_ids for ex in batch], dtype=torch.float32)
    size_hw = (batch[0].size[1], batch[0].size[0])
    cond_kw = unet_kwargs(st.unet.config, cond.to(st.frozen_dtype), size_hw, tids)
    with torch.autocast(device.type, dtype=st.amp, enabled=st.amp is not None):
        x = noisy.to(st.frozen_dtype)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        pred = st.model(x, t, **cond_kw).sample
    loss = diffusion_loss(pred, target, t, st.noise_sched, cfg.snr_gamma) / cfg.grad_accum
    (st.scaler.scale(loss) if st.scaler else loss).backward()
    return loss.detach()


def _cached_inputs(st: TrainState, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents sampled from each crop's cached posterior, scaled; text conditioning with dropout)."""
    gen = st.gen
    lat = []
    for ex in batch:
        vid = ex.latent_ids[int(torch.randint(len(ex.latent_ids), (1,), generator=gen))]
        mean, std = st.latent_cache[vid]
        lat.append(mean + std * torch.randn(mean.shape, generator=gen))
    latents = (torch.stack(lat) - st.shift) * st.scaling
    drop = torch.rand(len(batch), generator=gen) < st.cfg.caption_dropout
    ids = [0 if d else ex.text_id for ex, d in zip(batch, drop.tolist(), strict=True)]
    return latents, st.text_emb[ids]


def _flow_micro_step(st: TrainState, batch: list[Example]) -> torch.Tensor:
    """SD 3.x / FLUX.1: rectified flow, as diffusers' SD 3 and FLUX scripts train it. sigma is drawn
    logit-normal (mean 0, std 1: the scripts' default weighting scheme, whose loss weights are all 1)
    and shifted by the scheduler's `shift`; the target is the velocity noise - x."""
    from finestyle.core.mmdit import flow_inputs, mmdit_forward

    cfg, gen, device = st.cfg, st.gen, st.device
    latents, cond = _cached_inputs(st, batch)
    noise = torch.randn(latents.shape, generator=gen)
    u = torch.sigmoid(torch.randn(len(batch), generator=gen))
    shift = float(st.noise_sched.config.get("shift", 1.0))
    sigmas = shift * u / (1 + (shift - 1) * u)
    latents, noise, sigmas, cond = latents.to(device), noise.to(device), sigmas.to(device), cond.to(device)
    noisy, target = flow_inputs(latents, noise, sigmas)
    hidden, pooled = unpack_cond(cond.to(st.frozen_dtype), st.unet.config.pooled_projection_dim)
    with torch.autocast(device.type, dtype=st.amp, enabled=st.amp is not None):
        guidance = cfg.flux_guidance if st.unet.config.get("guidance_embeds") else None
        pred = mmdit_forward(st.model, st.family, noisy.to(st.frozen_dtype), sigmas, hidden, pooled, guidance)
    loss = F.mse_loss(pred.float(), target.float(), reduction="mean") / cfg.grad_accum
    (st.scaler.scale(loss) if st.scaler else loss).backward()
    return loss.detach()


def train_step(st: TrainState) -> float:
    """One optimizer step (with gradient accumulation); returns the step's loss. The step's one host
    sync is reading that loss, before the optimizer moves: a non-finite loss stops training there."""
    st.optimizer.zero_grad(set_to_none=True)
    losses = [_micro_step(st, _next_batch(st)) for _ in range(st.cfg.grad_accum)]
    step_loss = sum(float(v) for v in torch.stack(losses).float().cpu().tolist())
    if not math.isfinite(step_loss):
        last = latest_checkpoint(st.out / "checkpoints")
        raise TrainingDiverged(
            f"loss is {step_loss} at step {st.step + 1}; lower train.lr or use "
            f"mixed_precision=no. Last good checkpoint: {last or 'none'}"
        )
    if st.scaler:
        st.scaler.unscale_(st.optimizer)
    if st.cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(st.params, st.cfg.max_grad_norm)
    if st.scaler:
        st.scaler.step(st.optimizer)
        st.scaler.update()
    else:
        st.optimizer.step()
    st.lr_sched.step()
    st.step += 1
    st.steps_this_run += 1
    st.losses.append(step_loss)
    return step_loss
