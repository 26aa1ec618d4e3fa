"""`finestyle bench train`: training steps per second against the plain diffusers-style loop."""

from __future__ import annotations

import time
from typing import Any

import torch

from finestyle.artifacts.dataset import load_training_rows
from finestyle.bench.common import (
    bench_dataset,
    gpu_bf16_peak_tflops,
    matmul_peak,
    run_worker,
    sync_device,
    unet_train_step_gflop,
)
from finestyle.config import TrainConfig
from finestyle.core.env import cpu_name
from finestyle.core.models import (
    load_sd_pipeline,
    model_family,
    pick_device,
)
from finestyle.core.sd import (
    SDXL,
    encode_texts,
    native_size,
    pack_cond,
    text_encoders,
    unet_kwargs,
)
from finestyle.runtime.openvino import hardware_precision
from finestyle.train.loop import (
    add_lora,
    bucket_of,
    diffusion_loss,
    diffusion_target,
    resize_to_bucket,
    run_train,
)
from finestyle.train.state import TrainHooks


class StepProfile:
    """`torch.profiler` over the last step of a training run: its ten ops with the most self time."""

    def __init__(self, steps: int) -> None:
        self.steps, self.prof, self.top_ops = steps, None, []

    def on_step(self, st: Any) -> None:
        from torch.profiler import ProfilerActivity, profile

        if st.step == self.steps - 1:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if st.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        elif st.step == self.steps and self.prof is not None:
            self.prof.__exit__(None, None, None)
            cuda = st.device.type == "cuda"

            def self_us(e: Any) -> float:  # on a GPU, the kernels' own time (CPU time is launches)
                return e.self_device_time_total if cuda else e.self_cpu_time_total

            ops = sorted(self.prof.key_averages(), key=self_us, reverse=True)
            total = sum(self_us(e) for e in ops) or 1.0
            self.top_ops = [
                {
                    "op": e.key,
                    "calls": e.count,
                    "self_cpu_ms": e.self_cpu_time_total / 1e3,
                    **({"self_device_ms": e.self_device_time_total / 1e3} if cuda else {}),
                    "share": self_us(e) / total,
                }
                for e in ops[:10]
            ]


def train_worker(
    variant: str,
    dataset: str,
    base: str,
    resolution: int,
    steps: int,
    warmup: int,
    out: str,
    device: str = "cpu",
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """One benchmark variant in its own process (so its peak RSS / VRAM is its own).

    - `baseline` / `baseline-bf16`: what diffusers' reference LoRA script does each step: VAE-encode
      the image and run the text encoder, then the UNet forward/backward (fp32 / bf16 autocast).
    - `cached` / `cached-bf16`: this project's trainer (cached latents and text), fp32 / bf16 autocast.
    - `cached-compiled` / `cached-bf16-compiled`: the same with `--compile on --channels-last`; the
      warm-up steps hold the compile, reported as `first_step_seconds`.
    """
    import resource

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(
        dataset=dataset,
        base=base,
        out=out,
        steps=warmup + steps,
        resolution=resolution,
        samples=False,
        caption_dropout=0.0,
        device=device,
        mixed_precision="bf16" if "-bf16" in variant else "no",
        gradient_checkpointing=gradient_checkpointing,
        compile="on" if variant.endswith("-compiled") else "off",
        channels_last=variant.endswith("-compiled"),
    )
    t_load = time.perf_counter()
    if variant.startswith("cached"):
        import json
        from pathlib import Path

        profile = StepProfile(cfg.steps)
        run_train(cfg, log=lambda m: None, hooks=TrainHooks(on_step=profile.on_step))
        rep = json.loads((Path(out) / "report.json").read_text())
        # the last step ran under the profiler: it is not timed
        secs = rep["step_seconds"][warmup:-1] or rep["step_seconds"][-1:]
        losses = rep["losses"]
        first = rep["step_seconds"][0]
    else:
        secs, losses = _baseline_loop(cfg, warmup)
        first = None
    res = {
        "top_ops": profile.top_ops if variant.startswith("cached") else None,
        "first_step_seconds": first,
        "variant": variant,
        "device": device,
        "steps_per_s": len(secs) / sum(secs),
        "seconds_per_step": sum(secs) / len(secs),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "wall_seconds": time.perf_counter() - t_load,  # load + cache + every step
        "losses": losses,
    }
    if cuda:
        res["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["gpu"] = torch.cuda.get_device_name()
    return res


def _baseline_loop(cfg: Any, warmup: int) -> tuple[list[float], list[float]]:
    """The uncached reference loop (diffusers examples/text_to_image/train_text_to_image_lora.py)."""
    import contextlib

    import numpy as np

    rows = load_training_rows(cfg.dataset)
    dev = torch.device(cfg.device)
    bf16 = cfg.mixed_precision == "bf16"
    pipe = load_sd_pipeline(cfg.base, device=dev)
    unet, vae = pipe.unet, pipe.vae
    encoders = [enc for _, enc in text_encoders(pipe)]
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    vae.requires_grad_(False)
    for enc in encoders:
        enc.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    unet.requires_grad_(False)
    if bf16:  # as the reference script with --mixed_precision bf16: frozen weights in bf16
        for m in (unet, vae, *encoders):
            m.to(torch.bfloat16)
    add_lora(unet, cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # the LoRA weights train in fp32, as in this project's trainer
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    g = torch.Generator(dev).manual_seed(cfg.seed)
    resolution = cfg.resolution or native_size(pipe)
    secs, losses = [], []
    for step in range(cfg.steps):
        sync_device(dev)
        t0 = time.perf_counter()
        r = rows[step % len(rows)]
        size = bucket_of(r["image"].size, cfg, resolution)
        img = resize_to_bucket(r["image"], size)
        px = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(dev)
        px = px.to(vae.dtype)
        latents = (vae.encode(px).latent_dist.sample(generator=g) * vae.config.scaling_factor).float()
        hidden, pooled = encode_texts(pipe, [r["text"]], dev)
        cond = pack_cond(hidden, pooled).to(unet.dtype)
        noise = torch.randn(latents.shape, generator=g, device=dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g, device=dev)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with amp:
            noisy = sched.add_noise(latents, noise, t).to(unet.dtype)
            pred = unet(noisy, t, **unet_kwargs(unet.config, cond, (size[1], size[0]))).sample
        loss = diffusion_loss(pred.float(), diffusion_target(sched, latents, noise, t), t, sched, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        sync_device(dev)
        if step >= warmup:
            secs.append(time.perf_counter() - t0)
    return secs, losses


def bench_train(
    base: str = "builtin:sd15-random",
    resolution: int = 256,
    steps: int = 3,
    warmup: int = 1,
    variants: tuple[str, ...] | None = None,
    device: str = "cpu",
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Trainer steps/s and peak memory against the uncached baseline, each in its own process.

    On CPU the variants are fp32 baseline, cached fp32 and cached bf16; on CUDA, the bf16 baseline and
    cached bf16 (peak VRAM from `torch.cuda.max_memory_allocated`), plus the achieved TFLOP/s of the
    UNet forward+backward and its share of the card's bf16 peak (MFU).
    """
    import tempfile

    device = str(pick_device(device))
    cuda = device.startswith("cuda")
    if variants is None:
        # SDXL in fp32 needs 14 GB of weights before any activation: bf16 only, as its users train it
        big = model_family(base) == SDXL
        variants = ("baseline-bf16", "cached-bf16") if cuda or big else ("baseline", "cached", "cached-bf16")
    with tempfile.TemporaryDirectory() as d:
        ds = bench_dataset(f"{d}/ds", resolution)
        res = {}
        for v in variants:
            res[v] = run_worker(
                f"train_worker({v!r}, {ds!r}, {base!r}, {resolution}, {steps}, {warmup}, "
                f"{d + '/' + v!r}, {device!r}, {gradient_checkpointing!r})",
                f"variant {v}",
            )
    baseline = "baseline-bf16" if "baseline-bf16" in res else "baseline"
    base_sps = res[baseline]["steps_per_s"] if baseline in res else None
    gflop = unet_train_step_gflop(base, resolution, device)
    peak = gpu_bf16_peak_tflops(torch.cuda.get_device_name()) if cuda else None
    # CPU: the share of this CPU's measured matmul peak in the variant's own precision (bf16 only
    # where the CPU has bf16 units: emulated, it has no peak worth dividing by, and takes minutes)
    cpu_peaks: dict[str, float] = {}
    if not cuda:
        cpu_peaks["fp32"] = matmul_peak(torch.float32) / 1e3
        if hardware_precision() == "bf16":
            cpu_peaks["bf16"] = matmul_peak(torch.bfloat16) / 1e3
    for name, v in res.items():
        v["ratio_vs_baseline"] = v["steps_per_s"] / base_sps if base_sps else None
        v["unet_tflops"] = gflop * v["steps_per_s"] / 1e3
        own = peak if cuda else cpu_peaks.get("bf16" if "-bf16" in name else "fp32")
        v["mfu"] = v["unet_tflops"] / own if own else None
    return {
        "base": base,
        "resolution": resolution,
        "batch": 1,
        "device": device,
        "cpu": cpu_name(),
        "gradient_checkpointing": gradient_checkpointing,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "measured_steps": steps,
        "warmup": warmup,
        "baseline": baseline,
        "unet_train_step_gflop": gflop,
        "gpu_bf16_peak_tflops": peak,
        "cpu_matmul_peak_tflops": cpu_peaks or None,
        "results": res,
    }
