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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finestyle import __version__
from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, KOHYA_WEIGHTS
from finestyle.artifacts.dataset import dataset_fingerprint, load_training_rows
from finestyle.config import TrainConfig, keyed_fields, to_dict
from finestyle.core.errors import FineStyleError, UserError
from finestyle.core.fs import hash_json, read_json, staging_dir, write_json
from finestyle.core.geometry import fit_size
from finestyle.core.memory import check_fits
from finestyle.core.models import load_sd_pipeline, model_fingerprint, pick_device, pipeline_class
from finestyle.core.sd import (
    SDXL,
    encode_texts,
    native_size,
    pack_cond,
    sgm_module_name,
    text_encoders,
    unet_family,
    unet_kwargs,
)
from finestyle.core.stage import find_reusable

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
    # SDXL's micro-conditioning: (original h, w, crop top, left, target h, w); unused by SD 1.x/2.x
    time_ids: tuple[int, ...] = ()


def bucket_of(
    image_size: tuple[int, int], cfg: TrainConfig, resolution: int | None = None
) -> tuple[int, int]:
    """The (w, h) training bucket of an image; `resolution` overrides cfg's (the model's native size
    when cfg leaves it unset)."""
    res = resolution or cfg.resolution or 512
    if not cfg.buckets:
        return (res, res)
    return fit_size(image_size, res, 64)


def crop_to_bucket(image: Any, size: tuple[int, int]) -> tuple[Any, tuple[int, int]]:
    """Resize to cover `size` keeping the aspect ratio, then centre-crop to it.

    Returns the crop and its top-left corner (top, left) in the resized image: SDXL's crop
    conditioning.
    """
    from PIL import Image

    w, h = size
    scale = max(w / image.width, h / image.height)
    im = image.resize(
        (max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h)), (top, left)


def resize_to_bucket(image: Any, size: tuple[int, int]) -> Any:
    """Resize to cover `size` keeping the aspect ratio, then centre-crop to it."""
    return crop_to_bucket(image, size)[0]


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
    pipe: Any,
    rows: list[dict[str, Any]],
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    resolution: int | None = None,
) -> tuple[list[Example], list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Encode every crop once (mean, std of the VAE posterior) and every unique text once.

    Returns (examples, latent cache [(mean, std)], text conditioning [n_texts, seq, dim]; index 0
    is ""). For SDXL the conditioning rows hold both encoders' hidden states and the pooled
    embedding (`core.sd.pack_cond`), and each example carries its own time ids.
    """
    texts = [""] + sorted({r["text"] for r in rows})
    text_index = {t: i for i, t in enumerate(texts)}
    embs = []
    for k in range(0, len(texts), 16):
        hidden, pooled = encode_texts(pipe, texts[k : k + 16], device)
        embs.append(pack_cond(hidden, pooled).to(dtype).cpu())
    text_emb = torch.cat(embs)
    latents: list[tuple[torch.Tensor, torch.Tensor]] = []
    examples: list[Example] = []
    vae = pipe.vae
    for r in rows:
        size = bucket_of(r["image"].size, cfg, resolution)
        img, top_left = crop_to_bucket(r["image"], size)
        ow, oh = r["image"].size
        tids = (oh, ow, *top_left, size[1], size[0])
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        variants = [arr, arr.flip(-1)] if cfg.flip else [arr]
        ids = []
        for v in variants:
            dist = vae.encode(v[None].to(device, vae.dtype)).latent_dist
            latents.append((dist.mean[0].float().cpu(), dist.std[0].float().cpu()))
            ids.append(len(latents) - 1)
        examples.append(Example(text_index[r["text"]], size, tuple(ids), tids))
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
    """diffusers LoRA format (+ adapter metadata so alpha survives reload), kohya copy, config.

    The kohya copy uses the family's own module names: diffusers' names for SD 1.x/2.x (which is
    what kohya's SD 1.5 LoRAs use) and the original SGM names (`input_blocks_4_1_...`) for SDXL.
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    family = unet_family(unet.config)
    peft_sd = lora_state_dict(unet)
    diff_sd = convert_state_dict_to_diffusers(peft_sd)
    pipeline_class(family).save_lora_weights(
        folder,
        unet_lora_layers=diff_sd,
        weight_name=ADAPTER_WEIGHTS,
        safe_serialization=True,
        unet_lora_adapter_metadata=lcfg.to_dict(),
    )
    if family == SDXL:
        lpb = int(unet.config.layers_per_block)
        peft_sd = {sgm_module_name(k, lpb): v for k, v in peft_sd.items()}
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
            "ss_base_model_version": "sdxl_base_v1-0" if family == SDXL else "sd_v1",
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


EVAL_FIELDS = ("eval_every", "eval_judge", "eval_prompts", "eval_seeds", "eval_steps")


def train_cache_key(cfg: TrainConfig) -> str:
    """Content key of a training run: dataset fingerprint + base + every option that changes weights.

    Checkpoint evaluation changes adapter/ only when it selects the weights (`select=best`)."""
    conf = keyed_fields(cfg, skip=EVAL_FIELDS if cfg.select == "last" else ())
    return hash_json(
        {
            "stage": "train",
            "v": 1,
            "dataset": dataset_fingerprint(cfg.dataset),
            "base": model_fingerprint(cfg.base),
            "config": conf,
        }
    )


@dataclass
class TrainResult:
    """What a training run made: the adapter, the run folder and its figures.

    A data-parallel worker (rank > 0) returns only the paths, steps and its rank; rank 0 reports.
    `selected_step` and `selection` are set when checkpoint evaluation chose adapter/."""

    adapter: str
    out: str
    steps: int
    steps_per_s: float = 0.0
    final_loss: float = float("nan")
    trainable_params: int = 0
    samples_dir: str = ""
    cache_key: str = ""
    reused: bool = False
    rank: int = 0
    selected_step: int | None = None
    selection: dict[str, float] | None = None


@dataclass
class TrainHooks:
    """Callbacks into the loop, for evaluation at checkpoints, progress reporting and tests.

    `on_step(state)` runs after every optimizer step; `on_checkpoint(state, path)` after each saved
    checkpoint (rank 0 only). The train package never imports their callers.
    """

    on_step: Callable[[TrainState], None] | None = None
    on_checkpoint: Callable[[TrainState, Path], None] | None = None


@dataclass
class TrainState:
    """Everything one training run holds between setup, the steps and finish."""

    cfg: TrainConfig
    out: Path
    world: int
    rank: int
    device: torch.device
    amp: torch.dtype | None
    pipe: Any = None
    model: Any = None
    noise_sched: Any = None
    frozen_dtype: torch.dtype = torch.float32
    rows: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: str = ""
    examples: list[Example] = field(default_factory=list)
    latent_cache: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    text_emb: torch.Tensor | None = None
    scaling: float = 1.0
    lcfg: Any = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    optimizer: Any = None
    lr_sched: Any = None
    scaler: Any = None
    gen: torch.Generator | None = None
    step: int = 0
    epoch: int = 0
    pos: int = 0
    batches: list[list[int]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    steps_this_run: int = 0
    style: str = "the reference"
    prompts: list[str] = field(default_factory=list)
    cache_s: float = 0.0
    t_start: float = 0.0
    resolution: int = 512  # the training resolution: cfg's, else the base model's native size

    @property
    def unet(self) -> Any:
        return self.pipe.unet

    @property
    def main_proc(self) -> bool:
        return self.rank == 0


def run_train(cfg: TrainConfig, log=_log, hooks: TrainHooks | None = None) -> TrainResult:
    """Train an adapter. Returns a small summary (paths, steps, speed, loss, parameter counts)."""
    reused = reused_result(cfg, log)
    if reused is not None:
        return reused
    state = setup(cfg, log)
    loop_s = fit(state, hooks or TrainHooks())
    return finish(state, loop_s, log)


def reused_result(cfg: TrainConfig, log=_log) -> TrainResult | None:
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


def setup(cfg: TrainConfig, log=_log) -> TrainState:
    """Load, cache, add the adapter, build the optimizer and resume: a state ready for `fit`."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    world, rank, device = _distributed(cfg)
    amp = _precision(cfg, device)
    if amp is not None and device.type == "cpu" and amp == torch.float16:
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 or no on the CPU")
    st = TrainState(cfg=cfg, out=out, world=world, rank=rank, device=device, amp=amp, t_start=t_start)
    _load_and_cache(st)
    _add_adapter_and_optimizer(st)
    _maybe_resume(st, log)
    st.style = _dataset_style(cfg.dataset) or "the reference"
    st.prompts = cfg.sample_prompts or default_sample_prompts(st.rows, st.style)
    st.batches = epoch_batches(st.examples, cfg.batch_size, cfg.seed, st.epoch)
    return st


def _load_and_cache(st: TrainState) -> None:
    """1-2. Load the dataset and base model; cache latents and text embeddings; VAE/text encoder leave."""
    from diffusers import DDPMScheduler

    cfg, device = st.cfg, st.device
    st.rows = load_training_rows(cfg.dataset)
    st.fingerprint = dataset_fingerprint(cfg.dataset)
    check_fits("train", cfg.base, "train on a machine with more memory (or a GPU)")
    # fp32 everywhere for the one-off caching (an fp16 VAE can overflow); the UNet is cast below.
    pipe = st.pipe = load_sd_pipeline(cfg.base, device=device, dtype=torch.float32)
    st.noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    st.frozen_dtype = pipe.unet.dtype
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
    # Mixed precision: hold the frozen UNet weights in the autocast dtype once, rather than letting
    # autocast re-cast 860M fp32 weights on every forward (measured: most of the bf16 gain on CPU).
    # The LoRA weights added later stay fp32.
    if st.amp is not None and pipe.unet.dtype != st.amp:
        pipe.unet.to(st.amp)
        st.frozen_dtype = st.amp


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
    st.model = unet
    if st.world > 1:
        # Data parallel (launched by `accelerate launch` / torchrun): DDP averages the LoRA gradients,
        # each rank takes its own batch of every global step.
        from torch.nn.parallel import DistributedDataParallel

        dev_ids = [st.device.index] if st.device.type == "cuda" else None
        st.model = DistributedDataParallel(unet, device_ids=dev_ids)


def _maybe_resume(st: TrainState, log=_log) -> None:
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


def _next_batch(st: TrainState) -> list[Example]:
    """This rank's next batch: every rank walks the same order and keeps its own slot."""
    batch: list[Example] = []
    for r in range(st.world):
        if st.pos >= len(st.batches):
            st.epoch, st.pos = st.epoch + 1, 0
            st.batches = epoch_batches(st.examples, st.cfg.batch_size, st.cfg.seed, st.epoch)
        if r == st.rank:
            batch = [st.examples[i] for i in st.batches[st.pos]]
        st.pos += 1
    return batch


def _micro_step(st: TrainState, batch: list[Example]) -> float:
    """One forward/backward on one batch from the caches; returns its (accumulation-scaled) loss."""
    cfg, gen, device = st.cfg, st.gen, st.device
    # inputs from the caches: sample the posterior, drop captions, draw noise and timesteps
    lat = []
    for ex in batch:
        vid = ex.latent_ids[int(torch.randint(len(ex.latent_ids), (1,), generator=gen))]
        mean, std = st.latent_cache[vid]
        lat.append(mean + std * torch.randn(mean.shape, generator=gen))
    latents = torch.stack(lat) * st.scaling
    drop = torch.rand(len(batch), generator=gen) < cfg.caption_dropout
    ids = [0 if d else ex.text_id for ex, d in zip(batch, drop.tolist(), strict=True)]
    cond = st.text_emb[ids]
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
        pred = st.model(noisy.to(st.frozen_dtype), t, **cond_kw).sample
    loss = diffusion_loss(pred, target, t, st.noise_sched, cfg.snr_gamma) / cfg.grad_accum
    if not torch.isfinite(loss):
        last = latest_checkpoint(st.out / "checkpoints")
        raise TrainingDiverged(
            f"loss is {loss.item()} at step {st.step + 1}; lower train.lr or use "
            f"mixed_precision=no. Last good checkpoint: {last or 'none'}"
        )
    (st.scaler.scale(loss) if st.scaler else loss).backward()
    return loss.item()


def train_step(st: TrainState) -> float:
    """One optimizer step (with gradient accumulation); returns the step's loss."""
    st.optimizer.zero_grad(set_to_none=True)
    step_loss = sum(_micro_step(st, _next_batch(st)) for _ in range(st.cfg.grad_accum))
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
            _write_samples(st.pipe, st.prompts, cfg, st.out, st.step, st.device)
    bar.close()
    return time.perf_counter() - t_loop


def finish(st: TrainState, loop_s: float, log=_log) -> TrainResult:
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
        _write_samples(st.pipe, st.prompts, cfg, out, st.step, st.device, final=True)
    plot_loss(st.losses, out / "loss.png")
    report = _train_report(st, loop_s, meta["cache_key"])
    write_json(out / "report.json", report)
    n_train, n_unet = report["trainable_params"], report["unet_params"]
    log(
        f"train: {st.step} steps, loss {report['final_loss']:.4f} (last 10), {report['steps_per_s']:.2f} "
        f"steps/s, {n_train:,} trainable params "
        f"({100 * n_train / n_unet:.3f}% of the UNet) -> {adapter_dir}"
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
        "target_regex": cfg.target_regex,
        "rank": cfg.rank,
        "alpha": cfg.lora_alpha,
        "weight_name": ADAPTER_WEIGHTS,
        "kohya_weight_name": KOHYA_WEIGHTS,
        "style": st.style,
        # concept words the crops taught (whole-image rows carry a caption, not one concept)
        "concepts": sorted({r["concept"] for r in st.rows if r.get("concept") and r.get("method") != "full"}),
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
        "family": unet_family(st.unet.config),
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
    for _, enc in text_encoders(pipe):
        enc.to(device)
    try:
        low = pipe.unet.dtype if pipe.unet.dtype != torch.float32 else None
        with torch.autocast(device.type, dtype=low, enabled=low is not None):  # bf16/fp16 UNet, fp32 VAE/text
            grid = sample_grid(pipe, prompts, cfg.sample_steps, cfg.sample_resolution, seed=cfg.seed)
    finally:
        pipe.vae.to("cpu")
        for _, enc in text_encoders(pipe):
            enc.to("cpu")
        if was_training:
            pipe.unet.train()
    (out / "samples").mkdir(exist_ok=True)
    grid.save(out / "samples" / (f"final-step-{step:07d}.png" if final else f"step-{step:07d}.png"))
