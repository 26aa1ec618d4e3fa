"""Stage 2, train: LoRA adapters on the UNet (FineStyle: cross-attention K/V only).

One flat loop (`run_train`), with the pieces it needs as small module-level functions: data order,
latent/text caches, loss, checkpoint write/read, samples, adapter export.

Fast by design: a FineStyle dataset is small, so VAE latents (their mean/std, sampled each step
exactly as an uncached loop would) and text embeddings are computed once, then the VAE and text
encoder leave the device before the loop starts.

Resume is exact: a checkpoint holds the adapter, optimizer, LR scheduler, grad scaler, every RNG
state, the step and the data-order position; on CPU fp32 a killed-and-resumed run ends with the
same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finestyle import __version__
from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, KOHYA_WEIGHTS
from finestyle.artifacts.dataset import dataset_fingerprint, load_training_rows
from finestyle.config import TrainConfig, to_dict
from finestyle.config.train import target_regex_for
from finestyle.core.env import cpu_has_bf16
from finestyle.core.errors import UserError
from finestyle.core.fs import staging_dir, write_json
from finestyle.core.memory import check_fits
from finestyle.core.models import load_sd_pipeline, model_family, model_fingerprint, pick_device
from finestyle.core.sd import (
    MMDIT,
    SD3,
    native_size,
    pipe_family,
    text_encoders,
)
from finestyle.core.stage import find_reusable
from finestyle.core.text import phrase_in_window, window
from finestyle.core.tracking import RunTracker, parse_trackers
from finestyle.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from finestyle.train.data import (
    Example,
    bucket_of,
    build_caches,
    crop_to_bucket,
    epoch_batches,
    resize_to_bucket,
)
from finestyle.train.lora import add_lora, load_lora_state, lora_state_dict, save_adapter
from finestyle.train.samples import (
    SWAP_OBJECTS,
    default_sample_prompts,
    plot_loss,
    sample_grid,
    write_samples,
)
from finestyle.train.state import (
    EVAL_FIELDS,
    TrainHooks,
    TrainingDiverged,
    TrainResult,
    TrainState,
    dataset_style,
    log_line,
    train_cache_key,
)
from finestyle.train.step import diffusion_loss, diffusion_target, train_precision, train_step


def run_train(cfg: TrainConfig, log=log_line, hooks: TrainHooks | None = None) -> TrainResult:
    """Train an adapter. Returns a small summary (paths, steps, speed, loss, parameter counts)."""
    reused = reused_result(cfg, log)
    if reused is not None:
        return reused
    state = setup(cfg, log)
    loop_s = fit(state, hooks or TrainHooks())
    return finish(state, loop_s, log)


def reused_result(cfg: TrainConfig, log=log_line) -> TrainResult | None:
    """The summary of a finished run in `cfg.out` with the same content key, or None."""
    out, key = Path(cfg.out), train_cache_key(cfg)
    old = find_reusable(
        out,
        "report.json",
        key,
        stage="train",
        same="dataset, base and options",
        force=cfg.force,
        needs=(f"adapter/{ADAPTER_WEIGHTS}",),
        log=log,
    )
    if old is None or old.get("steps") != cfg.steps:
        return None
    return TrainResult(
        adapter=str(out / "adapter"),
        out=str(out),
        steps=old["steps"],
        reused=True,
        steps_per_s=old["steps_per_s"],
        final_loss=old["final_loss"],
        trainable_params=old["trainable_params"],
        samples_dir=str(out / "samples"),
        cache_key=key,
    )


def setup(cfg: TrainConfig, log=log_line) -> TrainState:
    """Load, cache, add the adapter, build the optimizer and resume: a state ready for `fit`."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    world, rank, device = _distributed(cfg)
    amp = train_precision(cfg, device)
    if amp is not None and device.type == "cpu" and amp == torch.float16:
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on the CPU")
    if amp == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16() and rank == 0:
        log(
            "train: this CPU has no bf16 units (AMX / AVX-512 BF16), so bf16 runs emulated and slower than "
            "fp32 here (--mixed-precision no is faster); samples are drawn in fp32"
        )
    st = TrainState(cfg=cfg, out=out, world=world, rank=rank, device=device, amp=amp, t_start=t_start)
    _load_and_cache(st)
    _add_adapter_and_optimizer(st)
    _maybe_resume(st, log)
    st.style = dataset_style(cfg.dataset) or "the reference"
    st.prompts = cfg.sample_prompts or default_sample_prompts(st.rows, st.style)
    st.batches = epoch_batches(st.examples, cfg.batch_size, cfg.seed, st.epoch, cfg.whole_image_weight)
    if st.main_proc and parse_trackers(cfg.report_to):
        st.tracker = start_tracking(st, log)
    return st


def start_tracking(st: TrainState, log=log_line) -> RunTracker:
    """The run's trackers: a fresh run gets the config and content keys; a resumed one continues its run."""
    cfg = st.cfg
    tracker = RunTracker(parse_trackers(cfg.report_to), st.out, cfg.tracking_uri)
    if st.step == 0:
        tracker.hyperparameters(to_dict(cfg))
    tracker.tags(
        {
            "finestyle.dataset_key": st.fingerprint,
            "finestyle.base_key": model_fingerprint(cfg.base),
            "finestyle.train_key": train_cache_key(cfg),
            "finestyle.style": st.style,
        }
    )
    where = ", ".join(f"{k}={v}" for k, v in tracker.identity.items() if k != "trackers")
    log(f"train: tracking to {', '.join(tracker.names)} ({where})" + (" (resumed run)" if st.step else ""))
    return tracker


def _load_and_cache(st: TrainState) -> None:
    """1-2. Load the dataset and base model; cache latents and text embeddings; VAE/text encoder leave."""
    from diffusers import DDPMScheduler

    cfg, device = st.cfg, st.device
    st.rows = load_training_rows(cfg.dataset)
    st.fingerprint = dataset_fingerprint(cfg.dataset)
    fits_hint = "train on a machine with more memory (or a GPU)"
    if cfg.t5 and model_family(cfg.base) == SD3:
        fits_hint += ", or without T5 (--no-t5: CLIP-L and CLIP-G only)"
    check_fits("train", cfg.base, fits_hint, exclude=() if cfg.t5 else ("text_encoder_3",))
    # fp32 everywhere for the one-off caching (an fp16 VAE can overflow); the UNet is cast below.
    pipe = st.pipe = load_sd_pipeline(cfg.base, device=device, dtype=torch.float32, without_t5=not cfg.t5)
    st.family = pipe_family(pipe)
    check_style_in_window(
        cfg.dataset, st.rows, dataset_style(cfg.dataset), [t for t, _ in text_encoders(pipe)]
    )
    if st.family in MMDIT:  # flow matching with the model's own scheduler settings (its `shift`)
        from diffusers import FlowMatchEulerDiscreteScheduler

        st.noise_sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    else:
        st.noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    st.frozen_dtype = st.unet.dtype
    t_cache = time.perf_counter()
    st.resolution = cfg.resolution or native_size(pipe)
    st.examples, st.latent_cache, st.text_emb = build_caches(
        pipe, st.rows, cfg, device, st.frozen_dtype, st.resolution
    )
    if cfg.cache == "disk":
        st.latent_cache, st.text_emb = _through_disk(st.out, cfg, st.latent_cache, st.text_emb)
    st.cache_s = time.perf_counter() - t_cache
    pipe.vae.to("cpu")
    for _, enc in text_encoders(pipe):
        enc.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    st.scaling = pipe.vae.config.scaling_factor
    st.shift = float(pipe.vae.config.get("shift_factor") or 0.0)
    # Mixed precision: hold the frozen UNet weights in the autocast dtype once, rather than letting
    # autocast re-cast 860M fp32 weights on every forward (measured: most of the bf16 gain on CPU).
    # The LoRA weights added later stay fp32.
    if st.amp is not None and st.unet.dtype != st.amp:
        st.unet.to(st.amp)
        st.frozen_dtype = st.amp


def check_style_in_window(
    dataset: str, rows: list[dict[str, Any]], style: str | None, tokenizers: list[Any]
) -> None:
    """Refuse, in one line, a dataset where a row's style phrase lies past a text encoder's window: the
    encoder would cut it, and the adapter would train on rows that never name the style."""
    if not style:
        return
    cut = [i for i, r in enumerate(rows) if not phrase_in_window(tokenizers, r["text"], style)]
    if cut:
        n = window(tokenizers[0]) if tokenizers else 0
        raise UserError(
            f"dataset {dataset!r}: {len(cut)} of {len(rows)} rows put the style phrase {style!r} past the text "
            f"encoder's {n}-token window (e.g. row {cut[0]}), so training would never see it; prepare it "
            "again with this base (`finestyle prepare --base ...` fits texts), or shorten the texts"
        )


def _through_disk(
    out: Path, cfg: TrainConfig, latent_cache: list, text_emb: torch.Tensor
) -> tuple[list, torch.Tensor]:
    """Write the caches to one safetensors file and read them back (`cache=disk`)."""
    from safetensors.torch import load_file, save_file

    cache_file = out / "cache" / f"{train_cache_key(cfg)[:16]}.safetensors"
    cache_file.parent.mkdir(exist_ok=True)
    flat = {f"m{i}": m for i, (m, _) in enumerate(latent_cache)} | {
        f"s{i}": s for i, (_, s) in enumerate(latent_cache)
    }
    save_file({**flat, "text": text_emb}, str(cache_file))
    loaded = load_file(str(cache_file))
    return [(loaded[f"m{i}"], loaded[f"s{i}"]) for i in range(len(latent_cache))], loaded["text"]


def _add_adapter_and_optimizer(st: TrainState) -> None:
    """3-4. LoRA (fp32, seeded), optimizer, LR schedule, scaler, RNG and DDP wrapping."""
    from diffusers.optimization import get_scheduler

    cfg, unet = st.cfg, st.unet
    # Seed first: the LoRA init draws from the global RNG, and the seed must make the run reproducible.
    torch.manual_seed(cfg.seed)
    unet.requires_grad_(False)
    st.lcfg = add_lora(unet, cfg)
    st.params = [p for p in unet.parameters() if p.requires_grad]
    for p in st.params:
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError("train.use_8bit_adam needs bitsandbytes (GPU); pip install bitsandbytes") from exc
        st.optimizer = bnb.optim.AdamW8bit(st.params, lr=cfg.lr, weight_decay=1e-2)
    else:
        st.optimizer = torch.optim.AdamW(st.params, lr=cfg.lr, weight_decay=1e-2)
    st.lr_sched = get_scheduler(
        cfg.lr_scheduler,
        optimizer=st.optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.steps,
    )
    st.scaler = torch.amp.GradScaler("cuda") if st.amp == torch.float16 and st.device.type == "cuda" else None
    st.gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * st.rank)
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    st.model = unet
    if st.world > 1:
        # Data parallel (launched by `accelerate launch` / torchrun): DDP averages the LoRA gradients,
        # each rank takes its own batch of every global step.
        from torch.nn.parallel import DistributedDataParallel

        dev_ids = [st.device.index] if st.device.type == "cuda" else None
        st.model = DistributedDataParallel(unet, device_ids=dev_ids)
    if cfg.compile == "on":
        # The same parameters, traced and fused by inductor; checkpoints still read st.unet. One
        # static graph per bucket shape (inductor's dynamic spatial shapes fail on the UNet's
        # up-sampling), compiled on the shape's first batch; the limit covers every bucket.
        import torch._dynamo as dynamo

        shapes = len({e.size for e in st.examples})
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 2 * shapes + 2)
        st.model = torch.compile(st.model, dynamic=False)


def _maybe_resume(st: TrainState, log=log_line) -> None:
    """With `resume`, restore the latest complete checkpoint: weights, optimizer, RNG, data position."""
    if not st.cfg.resume:
        return
    ckpt_root = st.out / "checkpoints"
    ck = latest_checkpoint(ckpt_root)
    if ck is None:
        if ckpt_root.is_dir() and any(ckpt_root.iterdir()):  # a fresh run has nothing to say
            log(f"train: --resume but no complete checkpoint in {ckpt_root}; starting from step 0")
        return
    state = load_checkpoint(ck, st.unet, st.optimizer, st.lr_sched, st.scaler, st.gen)
    st.step, st.losses = state["step"], state["losses"]
    st.epoch, st.pos = state["position"]["epoch"], state["position"]["pos"]
    if st.world > 1:  # checkpoints hold rank 0's RNG; give the other ranks their own stream
        st.gen.manual_seed(st.cfg.seed + 1_000_003 * st.rank + 7919 * st.step)
    log(f"train: resumed from {ck.name} (step {st.step})")


def fit(st: TrainState, hooks: TrainHooks) -> float:
    """5. The loop: steps, checkpoints (every N and at the end), samples, hooks. Returns its seconds."""
    from tqdm.auto import tqdm

    cfg = st.cfg
    bar = tqdm(
        total=cfg.steps,
        initial=st.step,
        desc="train",
        unit="step",
        disable=None if st.main_proc else True,
        file=sys.stderr,
    )
    t_loop = time.perf_counter()
    while st.step < cfg.steps:
        t_step = time.perf_counter()
        loss = train_step(st)
        st.step_times.append(time.perf_counter() - t_step)  # compute only: checkpoint I/O not counted
        if st.tracker is not None:
            lr = st.lr_sched.get_last_lr()[0]
            st.tracker.log(
                {"train/loss": loss, "train/lr": lr, "train/steps_per_s": 1 / st.step_times[-1]}, st.step
            )
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{st.lr_sched.get_last_lr()[0]:.2e}")
        if hooks.on_step:
            hooks.on_step(st)
        at_end = st.step == cfg.steps
        if st.main_proc and (at_end or (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0)):
            path = save_checkpoint(
                st.out / "checkpoints",
                st.step,
                st.unet,
                st.optimizer,
                st.lr_sched,
                st.scaler,
                st.gen,
                {"epoch": st.epoch, "pos": st.pos},
                st.losses,
                cfg.keep_checkpoints,
            )
            if hooks.on_checkpoint:
                hooks.on_checkpoint(st, path)
        if (
            st.main_proc
            and cfg.samples
            and cfg.sample_every
            and st.step % cfg.sample_every == 0
            and not at_end
        ):
            grid = write_samples(st.pipe, st.prompts, cfg, st.out, st.step, st.device)
            if st.tracker is not None:
                st.tracker.image("samples", grid, st.step)
    bar.close()
    return time.perf_counter() - t_loop


def finish(st: TrainState, loop_s: float, log=log_line) -> TrainResult:
    """6. Adapter, final samples, loss curve and report (rank 0 writes; the other ranks are done)."""
    cfg, out = st.cfg, st.out
    if not st.main_proc:
        _barrier(st.world)
        return TrainResult(adapter=str(out / "adapter"), out=str(out), steps=st.step, rank=st.rank)
    meta = adapter_meta(st)
    adapter_dir = out / "adapter"
    with staging_dir(adapter_dir) as tmp:
        save_adapter(tmp, st.unet, st.lcfg, meta)
    st.unet.eval()
    if cfg.samples:
        grid = write_samples(st.pipe, st.prompts, cfg, out, st.step, st.device, final=True)
        if st.tracker is not None:
            st.tracker.image("samples", grid, st.step)
    if st.tracker is not None:
        st.tracker.finish()
    plot_loss(st.losses, out / "loss.png")
    report = _train_report(st, loop_s, meta["cache_key"])
    write_json(out / "report.json", report)
    n_train, n_unet = report["trainable_params"], report["unet_params"]
    log(
        f"train: {st.step} steps, loss {report['final_loss']:.4f} (last 10), {report['steps_per_s']:.2f} "
        f"steps/s, {n_train:,} trainable params "
        f"({100 * n_train / n_unet:.3f}% of the {'transformer' if st.family in MMDIT else 'UNet'}) -> {adapter_dir}"
    )
    _barrier(st.world)
    return TrainResult(
        adapter=str(adapter_dir),
        out=str(out),
        steps=st.step,
        steps_per_s=report["steps_per_s"],
        final_loss=report["final_loss"],
        trainable_params=n_train,
        samples_dir=str(out / "samples"),
        cache_key=meta["cache_key"],
    )


def adapter_meta(st: TrainState) -> dict[str, Any]:
    """What finestyle_adapter.json records about the adapter the run holds now."""
    cfg = st.cfg
    return {
        "base_model": cfg.base,
        "base_fingerprint": model_fingerprint(cfg.base),
        "dataset": str(cfg.dataset),
        "dataset_fingerprint": st.fingerprint,
        "targets": cfg.targets,
        "target_regex": target_regex_for(cfg.targets, st.family),
        "rank": cfg.rank,
        "alpha": cfg.lora_alpha,
        "weight_name": ADAPTER_WEIGHTS,
        "kohya_weight_name": KOHYA_WEIGHTS,
        "style": st.style,
        # concept words the crops taught (whole-image rows carry a caption, not one concept)
        "concepts": sorted(
            {
                r["concept"]
                for r in st.rows
                if r.get("concept") and r.get("method") not in ("full", "background")
            }
        ),
        "train_config": to_dict(cfg),
        "step": st.step,
        "cache_key": train_cache_key(cfg),
        "finestyle": __version__,
    }


def _train_report(st: TrainState, loop_s: float, key: str) -> dict[str, Any]:
    cfg, device = st.cfg, st.device
    n_train = sum(p.numel() for p in st.params)
    n_unet = sum(p.numel() for n, p in st.unet.named_parameters() if "lora_" not in n)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "stage": "train",
        "cache_key": key,
        "config": to_dict(cfg),
        "base_model": cfg.base,
        "family": st.family,
        "resolution": st.resolution,
        "dataset_fingerprint": st.fingerprint,
        "device": str(device),
        "autocast": str(st.amp) if st.amp else "fp32",
        "steps": st.step,
        "steps_this_run": st.steps_this_run,
        "loop_seconds": loop_s,
        "cache_seconds": st.cache_s,
        "total_seconds": time.perf_counter() - st.t_start,
        "steps_per_s": st.steps_this_run / loop_s if loop_s > 0 else 0.0,
        "peak_memory_gib": peak,
        "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
        "trainable_params": n_train,
        "unet_params": n_unet,
        "trainable_share": n_train / n_unet,
        "examples": len(st.examples),
        "unique_texts": int(st.text_emb.shape[0]) - 1,
        "buckets": sorted({f"{e.size[0]}x{e.size[1]}" for e in st.examples}),
        "final_loss": float(np.mean(st.losses[-10:])) if st.losses else float("nan"),
        "world_size": st.world,
        "losses": st.losses,
        "step_seconds": st.step_times,
        "compile": cfg.compile,
        # the first step of a run (compile, first-touch allocations) apart from the steady median
        "first_step_seconds": st.step_times[0] if st.step_times else None,
        "steady_step_seconds": float(np.median(st.step_times[1:])) if len(st.step_times) > 1 else None,
        "sample_prompts": st.prompts,
    }


def _distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(world size, rank, device). Multi-process when launched by `accelerate launch`/torchrun."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=cfg.device == "cpu")  # initialises the process group (nccl / gloo)
        return state.num_processes, state.process_index, state.device
    return 1, 0, pick_device(cfg.device)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


__all__ = [
    "EVAL_FIELDS",
    "Example",
    "SWAP_OBJECTS",
    "TrainHooks",
    "TrainResult",
    "TrainState",
    "TrainingDiverged",
    "_add_adapter_and_optimizer",
    "_barrier",
    "dataset_style",
    "_distributed",
    "_load_and_cache",
    "log_line",
    "_maybe_resume",
    "train_precision",
    "_through_disk",
    "_train_report",
    "write_samples",
    "adapter_meta",
    "add_lora",
    "bucket_of",
    "build_caches",
    "crop_to_bucket",
    "default_sample_prompts",
    "diffusion_loss",
    "diffusion_target",
    "epoch_batches",
    "finish",
    "fit",
    "latest_checkpoint",
    "load_checkpoint",
    "load_lora_state",
    "lora_state_dict",
    "plot_loss",
    "resize_to_bucket",
    "reused_result",
    "run_train",
    "sample_grid",
    "save_adapter",
    "save_checkpoint",
    "setup",
    "train_cache_key",
    "train_step",
]
