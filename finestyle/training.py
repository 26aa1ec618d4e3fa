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

import json
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .concepts import _fit_size
from .config import TrainConfig, to_dict
from .dataset import dataset_fingerprint, load_training_rows
from .errors import FineStyleError, UserError
from .fsutil import hash_json, read_json, staging_dir, write_json
from .models import load_sd_pipeline, pick_device

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "finestyle_lora_kohya.safetensors"
# Objects used for concept-swap validation prompts: none of them is in the example references, so
# whatever of the references shows up in these samples is content leakage.
SWAP_OBJECTS = ("a sneaker", "a teapot", "a bicycle", "an owl")


class TrainingDiverged(FineStyleError):
    """The loss became NaN/inf. The message names the step; the last good checkpoint is kept."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# data


@dataclass
class Example:
    text_id: int
    size: tuple[int, int]  # (w, h) of the training bucket
    latent_ids: tuple[int, ...]  # cache ids: (plain,) or (plain, flipped)


def bucket_of(image_size: tuple[int, int], cfg: TrainConfig) -> tuple[int, int]:
    if not cfg.buckets:
        return (cfg.resolution, cfg.resolution)
    return _fit_size(image_size, cfg.resolution, 64)


def resize_to_bucket(image: Any, size: tuple[int, int]) -> Any:
    """Resize to cover `size` keeping the aspect ratio, then centre-crop to it."""
    from PIL import Image

    w, h = size
    scale = max(w / image.width, h / image.height)
    im = image.resize(
        (max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))


def epoch_batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a seeded shuffle, grouped so a batch holds one bucket size.

    Pure function of (seed, epoch): resume needs only the epoch and the position within it.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in order:
        by_bucket.setdefault(examples[i].size, []).append(i)
    batches = [idx[k : k + batch_size] for idx in by_bucket.values() for k in range(0, len(idx), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


@torch.no_grad()
def build_caches(
    pipe: Any, rows: list[dict[str, Any]], cfg: TrainConfig, device: torch.device, dtype: torch.dtype
) -> tuple[list[Example], list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Encode every crop once (mean, std of the VAE posterior) and every unique text once.

    Returns (examples, latent cache [(mean, std)], text embeddings [n_texts, seq, dim]; index 0 is "").
    """
    texts = [""] + sorted({r["text"] for r in rows})
    text_index = {t: i for i, t in enumerate(texts)}
    tok = pipe.tokenizer
    embs = []
    for k in range(0, len(texts), 16):
        ids = tok(
            texts[k : k + 16],
            padding="max_length",
            truncation=True,
            max_length=tok.model_max_length,
            return_tensors="pt",
        ).input_ids.to(device)
        embs.append(pipe.text_encoder(ids)[0].to(dtype).cpu())
    text_emb = torch.cat(embs)
    latents: list[tuple[torch.Tensor, torch.Tensor]] = []
    examples: list[Example] = []
    vae = pipe.vae
    for r in rows:
        size = bucket_of(r["image"].size, cfg)
        img = resize_to_bucket(r["image"], size)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        variants = [arr, arr.flip(-1)] if cfg.flip else [arr]
        ids = []
        for v in variants:
            dist = vae.encode(v[None].to(device, vae.dtype)).latent_dist
            latents.append((dist.mean[0].float().cpu(), dist.std[0].float().cpu()))
            ids.append(len(latents) - 1)
        examples.append(Example(text_index[r["text"]], size, tuple(ids)))
    return examples, latents, text_emb


# ------------------------------------------------------------------------------------------------
# adapters


def add_lora(unet: Any, cfg: TrainConfig) -> Any:
    """Attach a peft LoRA adapter to the modules matching cfg.targets; return the LoraConfig."""
    from peft import LoraConfig

    names = [
        n
        for n, m in unet.named_modules()
        if re.fullmatch(cfg.target_regex, n) and isinstance(m, torch.nn.Linear)
    ]
    if not names:
        raise UserError(
            f"train.targets: {cfg.targets!r} matches no Linear module of this UNet "
            "(e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k)"
        )
    init = {"gaussian": "gaussian", "default": True}[cfg.init]
    lcfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights=init,
        target_modules=cfg.target_regex,
    )
    unet.add_adapter(lcfg)
    return lcfg


def lora_state_dict(unet: Any) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state(unet: Any, state: dict[str, torch.Tensor]) -> None:
    """Load a peft-format LoRA state dict and check that every tensor landed (peft fails silently)."""
    from peft.utils import set_peft_model_state_dict

    res = set_peft_model_state_dict(unet, state)
    unexpected = getattr(res, "unexpected_keys", []) or []
    if unexpected:
        raise FineStyleError(f"checkpoint LoRA keys did not load: {unexpected[:3]}")
    now = lora_state_dict(unet)
    for k, v in state.items():
        if k not in now or not torch.equal(now[k].cpu(), v.cpu()):
            raise FineStyleError(f"checkpoint LoRA tensor {k} did not load")


def save_adapter(folder: Path, unet: Any, lcfg: Any, meta: dict[str, Any]) -> None:
    """diffusers LoRA format (+ adapter metadata so alpha survives reload), kohya copy, config."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    peft_sd = lora_state_dict(unet)
    diff_sd = convert_state_dict_to_diffusers(peft_sd)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=diff_sd,
        weight_name=ADAPTER_WEIGHTS,
        safe_serialization=True,
        unet_lora_adapter_metadata=lcfg.to_dict(),
    )
    # kohya / A1111 / ComfyUI naming: lora_unet_..., with alpha tensors per module
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    for k in list(kohya):
        if k.endswith(".lora_down.weight"):
            kohya[k.replace(".lora_down.weight", ".alpha")] = torch.tensor(float(lcfg.lora_alpha))
    save_file(
        {k: v.contiguous() for k, v in kohya.items()},
        str(folder / KOHYA_WEIGHTS),
        metadata={
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(lcfg.r),
            "ss_network_alpha": str(lcfg.lora_alpha),
            "ss_base_model_version": "sd_v1",
            "finestyle_targets": str(meta.get("targets")),
        },
    )
    write_json(folder / "finestyle_adapter.json", meta)


# ------------------------------------------------------------------------------------------------
# loss


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


# ------------------------------------------------------------------------------------------------
# checkpoints


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    st = {"gen": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(gen: torch.Generator, st: dict[str, Any]) -> None:
    gen.set_state(st["gen"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    unet: Any,
    optimizer: Any,
    lr_sched: Any,
    scaler: Any,
    gen: torch.Generator,
    position: dict[str, int],
    losses: list[float],
    keep: int,
) -> Path:
    """Write checkpoints/step-N atomically (state.json last), then prune the oldest beyond `keep`."""
    from safetensors.torch import save_file

    final = ckpt_root / f"step-{step:07d}"
    with staging_dir(final) as tmp:
        save_file(lora_state_dict(unet), str(tmp / "adapter.safetensors"))
        # optimizer/scheduler/RNG states are plain tensors and numbers: torch.save here, read back
        # with weights_only=True (no pickle code execution).
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_state(gen),
            },
            tmp / "training_state.pt",
        )
        write_json(
            tmp / "state.json", {"step": step, "position": position, "losses": losses, "complete": True}
        )
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").exists())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(
    path: Path, unet: Any, optimizer: Any, lr_sched: Any, scaler: Any, gen: torch.Generator
) -> dict[str, Any]:
    from safetensors.torch import load_file

    load_lora_state(unet, load_file(str(path / "adapter.safetensors")))
    st = torch.load(path / "training_state.pt", weights_only=True)
    optimizer.load_state_dict(st["optimizer"])
    lr_sched.load_state_dict(st["lr_scheduler"])
    if scaler is not None and st["scaler"]:
        scaler.load_state_dict(st["scaler"])
    _set_rng_state(gen, st["rng"])
    return read_json(path / "state.json")


# ------------------------------------------------------------------------------------------------
# samples and plots


def default_sample_prompts(rows: list[dict[str, Any]], style: str) -> list[str]:
    """Concept swaps: objects absent from the references, in the style, plus one kept concept."""
    concepts = [
        r["concept"]
        for r in rows
        if r.get("concept") and r.get("concept") != "background" and r.get("method") != "full"
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


# ------------------------------------------------------------------------------------------------
# the loop


def _precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32."""
    mp = cfg.mixed_precision
    if mp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]


def _dataset_style(folder: str) -> str | None:
    rep = Path(folder) / "report.json"
    if rep.exists():
        try:
            return json.loads(rep.read_text()).get("config", {}).get("style")
        except ValueError:
            return None
    return None


def train_cache_key(cfg: TrainConfig) -> str:
    """Content key of a training run: dataset fingerprint + base + every option that changes weights."""
    from .prepare import model_fingerprint

    conf = {
        k: v
        for k, v in to_dict(cfg).items()
        if k
        not in (
            "out",
            "resume",
            "device",
            "checkpoint_every",
            "keep_checkpoints",
            "sample_every",
            "sample_prompts",
            "sample_steps",
            "sample_resolution",
            "dataset",
            "base",
            "cache",
        )
    }
    return hash_json(
        {
            "stage": "train",
            "v": 1,
            "dataset": dataset_fingerprint(cfg.dataset),
            "base": model_fingerprint(cfg.base),
            "config": conf,
        }
    )


def run_train(cfg: TrainConfig, log=_log, stop_after: int | None = None) -> dict[str, Any]:
    """Train an adapter. Returns a small summary (paths, steps, speed, loss, parameter counts).

    Args:
        stop_after: testing aid; stop (as if killed) after this many steps, checkpoints included.
    """
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    out = Path(cfg.out)
    key = train_cache_key(cfg)
    if not cfg.force and (out / "report.json").exists() and (out / "adapter" / ADAPTER_WEIGHTS).exists():
        old = read_json(out / "report.json")
        if old.get("cache_key") == key and old.get("steps") == cfg.steps:
            log(f"train: reusing {out} (same dataset, base and options; --force to retrain)")
            return {
                "adapter": str(out / "adapter"),
                "out": str(out),
                "steps": old["steps"],
                "reused": True,
                "steps_per_s": old["steps_per_s"],
                "final_loss": old["final_loss"],
                "trainable_params": old["trainable_params"],
                "samples_dir": str(out / "samples"),
                "cache_key": key,
            }
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    world, rank, device = _distributed(cfg)
    main_proc = rank == 0
    amp = _precision(cfg, device)
    if amp is not None and device.type == "cpu" and amp == torch.float16:
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on the CPU")

    # 1. Load the dataset and the base model
    rows = load_training_rows(cfg.dataset)
    fingerprint = dataset_fingerprint(cfg.dataset)
    # fp32 everywhere for the one-off caching (an fp16 VAE can overflow); the UNet is cast below.
    pipe = load_sd_pipeline(cfg.base, device=device, dtype=torch.float32)
    unet, scheduler = pipe.unet, pipe.scheduler
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(scheduler.config)
    frozen_dtype = pipe.unet.dtype

    # 2. Cache latents (posterior mean/std) and text embeddings, then move VAE + text encoder off
    t_cache = time.perf_counter()
    examples, latent_cache, text_emb = build_caches(pipe, rows, cfg, device, frozen_dtype)
    if cfg.cache == "disk":
        from safetensors.torch import load_file, save_file

        cache_file = out / "cache" / f"{train_cache_key(cfg)[:16]}.safetensors"
        cache_file.parent.mkdir(exist_ok=True)
        flat = {f"m{i}": m for i, (m, _) in enumerate(latent_cache)} | {
            f"s{i}": s for i, (_, s) in enumerate(latent_cache)
        }
        save_file({**flat, "text": text_emb}, str(cache_file))
        loaded = load_file(str(cache_file))
        latent_cache = [(loaded[f"m{i}"], loaded[f"s{i}"]) for i in range(len(latent_cache))]
        text_emb = loaded["text"]
    cache_s = time.perf_counter() - t_cache
    pipe.vae.to("cpu")
    pipe.text_encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    scaling = pipe.vae.config.scaling_factor

    # 2b. Mixed precision: hold the frozen UNet weights in the autocast dtype once, rather than letting
    #     autocast re-cast 860M fp32 weights on every forward (measured: most of the bf16 gain on CPU).
    #     The LoRA weights added below stay fp32.
    if amp is not None and unet.dtype != amp:
        unet.to(amp)
        frozen_dtype = amp
    # 3. Adapter: only the LoRA parameters train, kept in fp32. Seed first: the LoRA init draws
    #    from the global RNG, and the seed must make the whole run reproducible.
    torch.manual_seed(cfg.seed)
    unet.requires_grad_(False)
    lcfg = add_lora(unet, cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    n_train = sum(p.numel() for p in params)
    n_unet = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    # 4. Optimizer, LR schedule, scaler, RNG
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise UserError("train.use_8bit_adam needs bitsandbytes (GPU); pip install bitsandbytes") from exc
        optimizer = bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=1e-2)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    lr_sched = get_scheduler(
        cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps
    )
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and device.type == "cuda" else None
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * rank)
    model = unet
    if world > 1:
        # Data parallel (launched by `accelerate launch` / torchrun): DDP averages the LoRA gradients,
        # each rank takes its own batch of every global step.
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    step, epoch, pos, losses = 0, 0, 0, []
    if cfg.resume:
        ck = latest_checkpoint(ckpt_root)
        if ck is None:
            log(f"train: --resume but no complete checkpoint in {ckpt_root}; starting from step 0")
        else:
            state = load_checkpoint(ck, unet, optimizer, lr_sched, scaler, gen)
            step, losses = state["step"], state["losses"]
            epoch, pos = state["position"]["epoch"], state["position"]["pos"]
            if world > 1:  # checkpoints hold rank 0's RNG; give the other ranks their own stream
                gen.manual_seed(cfg.seed + 1_000_003 * rank + 7919 * step)
            log(f"train: resumed from {ck.name} (step {step})")
    style = _dataset_style(cfg.dataset) or "the reference"
    prompts = cfg.sample_prompts or default_sample_prompts(rows, style)

    # 5. Training loop
    batches = epoch_batches(examples, cfg.batch_size, cfg.seed, epoch)
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc="train",
        unit="step",
        disable=None if main_proc else True,
        file=sys.stderr,
    )
    t_loop = time.perf_counter()
    steps_this_run = 0
    step_times: list[float] = []
    while step < cfg.steps:
        t_step = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            for r in range(world):  # every rank walks the same order and keeps its own slot
                if pos >= len(batches):
                    epoch, pos = epoch + 1, 0
                    batches = epoch_batches(examples, cfg.batch_size, cfg.seed, epoch)
                if r == rank:
                    batch = [examples[i] for i in batches[pos]]
                pos += 1
            # 5a. inputs from the caches: sample the posterior, pick flip, drop captions
            lat = []
            for ex in batch:
                vid = ex.latent_ids[int(torch.randint(len(ex.latent_ids), (1,), generator=gen))]
                mean, std = latent_cache[vid]
                lat.append(mean + std * torch.randn(mean.shape, generator=gen))
            latents = torch.stack(lat) * scaling
            drop = torch.rand(len(batch), generator=gen) < cfg.caption_dropout
            ids = [0 if d else ex.text_id for ex, d in zip(batch, drop.tolist(), strict=True)]
            cond = text_emb[ids]
            noise = torch.randn(latents.shape, generator=gen)
            if cfg.noise_offset:
                noise = noise + cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(batch),), generator=gen)
            latents, noise, t, cond = latents.to(device), noise.to(device), t.to(device), cond.to(device)
            noisy = noise_sched.add_noise(latents, noise, t)
            target = diffusion_target(noise_sched, latents, noise, t)
            # 5b. forward / backward
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                pred = model(noisy.to(frozen_dtype), t, encoder_hidden_states=cond.to(frozen_dtype)).sample
            loss = diffusion_loss(pred, target, t, noise_sched, cfg.snr_gamma) / cfg.grad_accum
            if not torch.isfinite(loss):
                last = latest_checkpoint(ckpt_root)
                raise TrainingDiverged(
                    f"loss is {loss.item()} at step {step + 1}; lower train.lr or use "
                    f"mixed_precision=no. Last good checkpoint: {last or 'none'}"
                )
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.item()
        # 5c. optimizer step
        if scaler:
            scaler.unscale_(optimizer)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_sched.step()
        step += 1
        steps_this_run += 1
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_sched.get_last_lr()[0]:.2e}")
        step_times.append(time.perf_counter() - t_step)  # compute only: checkpoint I/O not counted
        # 5d. checkpoints (every N steps and at the end) and samples
        at_end = step == cfg.steps
        if main_proc and (at_end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            save_checkpoint(
                ckpt_root,
                step,
                unet,
                optimizer,
                lr_sched,
                scaler,
                gen,
                {"epoch": epoch, "pos": pos},
                losses,
                cfg.keep_checkpoints,
            )
        if (
            main_proc
            and cfg.samples
            and cfg.sample_every
            and step % cfg.sample_every == 0
            and step < cfg.steps
        ):
            _write_samples(pipe, prompts, cfg, out, step, device)
        if stop_after is not None and steps_this_run >= stop_after:
            bar.close()
            return {"stopped_at": step}
    bar.close()
    loop_s = time.perf_counter() - t_loop

    # 6. Adapter, samples, loss curve, report (rank 0 writes; the others are done)
    if not main_proc:
        _barrier(world)
        return {"adapter": str(out / "adapter"), "out": str(out), "steps": step, "rank": rank}
    meta = {
        "base_model": cfg.base,
        "dataset": str(cfg.dataset),
        "dataset_fingerprint": fingerprint,
        "targets": cfg.targets,
        "target_regex": cfg.target_regex,
        "rank": cfg.rank,
        "alpha": cfg.lora_alpha,
        "weight_name": ADAPTER_WEIGHTS,
        "kohya_weight_name": KOHYA_WEIGHTS,
        "style": style,
        # concept words the crops taught (whole-image rows carry a caption, not one concept)
        "concepts": sorted({r["concept"] for r in rows if r.get("concept") and r.get("method") != "full"}),
        "train_config": to_dict(cfg),
        "cache_key": train_cache_key(cfg),
        "finestyle": __version__,
    }
    adapter_dir = out / "adapter"
    with staging_dir(adapter_dir) as tmp:
        save_adapter(tmp, unet, lcfg, meta)
    unet.eval()
    if cfg.samples:
        _write_samples(pipe, prompts, cfg, out, step, device, final=True)
    plot_loss(losses, out / "loss.png")
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    report = {
        "stage": "train",
        "cache_key": meta["cache_key"],
        "config": to_dict(cfg),
        "base_model": cfg.base,
        "dataset_fingerprint": fingerprint,
        "device": str(device),
        "autocast": str(amp) if amp else "fp32",
        "steps": step,
        "steps_this_run": steps_this_run,
        "loop_seconds": loop_s,
        "cache_seconds": cache_s,
        "total_seconds": time.perf_counter() - t_start,
        "steps_per_s": steps_this_run / loop_s if loop_s > 0 else 0.0,
        "peak_memory_gib": peak,
        "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
        "trainable_params": n_train,
        "unet_params": n_unet,
        "trainable_share": n_train / n_unet,
        "examples": len(examples),
        "unique_texts": int(text_emb.shape[0]) - 1,
        "buckets": sorted({f"{e.size[0]}x{e.size[1]}" for e in examples}),
        "final_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
        "world_size": world,
        "losses": losses,
        "step_seconds": step_times,
        "sample_prompts": prompts,
    }
    write_json(out / "report.json", report)
    log(
        f"train: {step} steps, {report['steps_per_s']:.2f} steps/s, {n_train:,} trainable params "
        f"({100 * n_train / n_unet:.3f}% of the UNet) -> {adapter_dir}"
    )
    result = {
        "adapter": str(adapter_dir),
        "out": str(out),
        "steps": step,
        "steps_per_s": report["steps_per_s"],
        "final_loss": report["final_loss"],
        "trainable_params": n_train,
        "samples_dir": str(out / "samples"),
        "cache_key": meta["cache_key"],
        "reused": False,
    }
    _barrier(world)
    return result


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


def _write_samples(
    pipe: Any,
    prompts: list[str],
    cfg: TrainConfig,
    out: Path,
    step: int,
    device: torch.device,
    final: bool = False,
) -> None:
    was_training = pipe.unet.training
    pipe.unet.eval()
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    try:
        low = pipe.unet.dtype if pipe.unet.dtype != torch.float32 else None
        with torch.autocast(device.type, dtype=low, enabled=low is not None):  # bf16/fp16 UNet, fp32 VAE/text
            grid = sample_grid(pipe, prompts, cfg.sample_steps, cfg.sample_resolution, seed=cfg.seed)
    finally:
        pipe.vae.to("cpu")
        pipe.text_encoder.to("cpu")
        if was_training:
            pipe.unet.train()
    (out / "samples").mkdir(exist_ok=True)
    grid.save(out / "samples" / (f"final-step-{step:07d}.png" if final else f"step-{step:07d}.png"))


def adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    """The finestyle_adapter.json of an adapter folder (base model, rank, alpha, concepts...)."""
    p = Path(adapter_dir) / "finestyle_adapter.json"
    if not p.exists():
        raise UserError(
            f"adapter {str(adapter_dir)!r} has no finestyle_adapter.json; pass the adapter/ "
            "folder written by `finestyle train`"
        )
    return read_json(p)
