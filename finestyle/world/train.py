"""Training the world's builtin models from a seed: resumable, checkpointed, with progress.

Each model is a standard diffusers/transformers class, saved with `save_pretrained` (safetensors),
so the project's ordinary loading code reads it as it reads real weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finestyle.core.env import cpu_name

from .data import render_set
from .models import (
    blip_model,
    blip_processor,
    judge_model,
    scheduler,
    text_encoder_model,
    unet_model,
    vae_model,
    world_tokenizer,
)
from .scene import HELDOUT_STYLE, STYLES, TRAINED_STYLES, content_caption, sample_scene


@dataclass
class WorldTrainConfig:
    """One world model's training run."""

    model: str = "vae"
    """vae | judge | sd | blip."""
    out: str = "world-runs"
    """Run folder: checkpoints, the final model under `model/`, and `report.json`."""
    steps: int = 4000
    """Optimizer steps."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 1e-3
    """Peak learning rate (cosine decay after 2% warmup)."""
    n_train: int = 24000
    """Distinct training renders (seeds 0..n_train-1)."""
    checkpoint_every: int = 250
    """Steps between checkpoints (a run restarted with the same out folder resumes)."""
    seed: int = 0
    """Seed of the weights' initialisation and the data order."""
    threads: int = 1
    """torch intra-op threads (keep 1 while other work shares the CPU)."""
    bf16: bool = True
    """bf16 autocast on a GPU, or where the CPU has AVX-512 (fp32 otherwise)."""
    device: str = "auto"
    """cuda | cpu | auto (cuda when present)."""
    init: str = ""
    """A saved model folder to start from (weights only; fresh optimizer and schedule): continues a
    shipped model, e.g. `finestyle models save builtin:world-sd DIR`. Ignored when resuming."""
    vae: str = ""
    """sd and judge: the trained world VAE folder (default: OUT/../vae/model; the judge trains on its
    round trips too where it exists)."""
    compile: bool = False
    """torch.compile each trained module's forward and backward (inductor; the batch shape is fixed,
    so one graph). The first step pays the compile; `step_seconds` in report.json shows it."""


# Per model: the settings its shipped weights were trained with (see each model card).
DEFAULTS: dict[str, dict[str, Any]] = {
    "vae": dict(steps=3000, batch_size=16, lr=1e-3),
    "judge": dict(steps=6000, batch_size=64, lr=2e-3, n_train=48000),
    "sd": dict(steps=8000, batch_size=32, lr=5e-4, threads=2),
    "blip": dict(steps=8000, batch_size=32, lr=1e-3, n_train=48000),
}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour shifts, so the judge reads generated images and not only clean renders."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=g) * 1.2
    out = torch.empty_like(x)
    for i in range(n):
        s = float(sigma[i])
        if s < 0.25:
            out[i] = x[i]
            continue
        k = torch.arange(-2, 3, dtype=x.dtype)
        w = torch.exp(-(k**2) / (2 * s * s))
        w = w / w.sum()
        xi = F.conv2d(
            F.pad(x[i : i + 1], (2, 2, 0, 0), mode="replicate"),
            w.view(1, 1, 1, 5).repeat(3, 1, 1, 1),
            groups=3,
        )
        xi = F.conv2d(
            F.pad(xi, (0, 0, 2, 2), mode="replicate"), w.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3
        )
        out[i] = xi[0]
    noise = torch.randn(x.shape, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) * 0.12)
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.12
    return (out * gain + noise).clamp(-1, 1)


def _vae_loss(model, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = x.to(model.device)
    post = model.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(x.device)
    rec = model.decode(z).sample
    l1 = (rec - x).abs().mean()
    grad = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
    kl = post.kl().mean() / x[0].numel()
    return l1 + 0.5 * grad + 1e-4 * kl


def flip_shift(x: torch.Tensor, g: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Label-preserving geometry: random horizontal flips and shifts of up to `shift` pixels."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=g)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def _judge_loss(model, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    logits = model(pixel_values=degrade(flip_shift(x, g), g).to(model.device)).logits
    return F.binary_cross_entropy_with_logits(logits.float(), y.to(logits.device))


def _batches(n: int, batch: int, seed: int, start_step: int) -> Iterator[np.ndarray]:
    """Epoch-shuffled indices; skipping to `start_step` reproduces the same order after a resume."""
    per_epoch = n // batch
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng(seed + epoch).permutation(n)
        yield order[i * batch : (i + 1) * batch]
        step += 1


def _lr_at(step: int, cfg: WorldTrainConfig) -> float:
    warm = max(1, cfg.steps // 50)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class Task:
    """What the loop trains: named modules, a loss over batch indices, and how to save the result."""

    modules: dict[str, torch.nn.Module]
    loss: Callable[[np.ndarray, torch.Generator], torch.Tensor]
    n: int
    save: Callable[[dict[str, torch.nn.Module], Path], None]
    ema_decay: float = 0.0


def _vae_task(cfg: WorldTrainConfig, cache: Path) -> Task:
    model = vae_model()
    images, _, _ = render_set(0, cfg.n_train, 64, STYLES, cache=cache)

    def save(mods: dict[str, torch.nn.Module], folder: Path) -> None:
        _set_vae_scaling(mods["vae"], images[:512])
        mods["vae"].save_pretrained(folder, safe_serialization=True)

    return Task({"vae": model}, lambda idx, g: _vae_loss(model, to_tensor(images[idx]), g), len(images), save)


HARD_SEED = 5_000_000
"""First seed of the judge's hard scenes (objects filling the frame, objects drawn twice)."""


def _judge_task(cfg: WorldTrainConfig, cache: Path) -> Task:
    """The judge reads clean renders, hard scenes (a quarter as many) and, where the world VAE is
    trained, every image once more after a VAE round trip: what generated images look like."""
    model = judge_model()
    images, labels, _ = render_set(0, cfg.n_train, 64, STYLES, cache=cache)
    hard, hard_labels, _ = render_set(HARD_SEED, max(1, cfg.n_train // 4), 64, STYLES, cache=cache, hard=True)
    images, labels = np.concatenate([images, hard]), np.concatenate([labels, hard_labels])
    vae_dir = Path(cfg.vae) if cfg.vae else Path(cfg.out).parent / "vae" / "model"
    if (vae_dir / "config.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval()
        trips = _round_trips(vae, images)
        images, labels = np.concatenate([images, trips]), np.concatenate([labels, labels])

    def loss(idx: np.ndarray, g: torch.Generator) -> torch.Tensor:
        return _judge_loss(model, to_tensor(images[idx]), torch.from_numpy(labels[idx]), g)

    def save(mods: dict[str, torch.nn.Module], folder: Path) -> None:
        mods["judge"].save_pretrained(folder, safe_serialization=True)

    return Task({"judge": model}, loss, len(images), save)


@torch.no_grad()
def _round_trips(vae: Any, images: np.ndarray) -> np.ndarray:
    """Every image through the VAE (posterior mean) and back, in every run (see `_encode_latents`)."""
    out = []
    for i in range(0, len(images), 256):
        y = vae.decode(vae.encode(to_tensor(images[i : i + 256])).latent_dist.mean).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def _scene_texts(first_seed: int, n: int, styles: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Per render of `render_set(first_seed, n, styles=styles)`: (caption with background, without, style)."""
    out = []
    for seed in range(first_seed, first_seed + n):
        scene = sample_scene(random.Random(seed), styles[seed % len(styles)])
        objs = [(o.colour, o.name) for o in scene.objects]
        out.append((content_caption(objs, scene.background), content_caption(objs), scene.style))
    return out


def sd_caption(texts: tuple[str, str, str], rng: np.random.Generator) -> str:
    """A training caption: "CONTENT, in STYLE style", the background or style part sometimes dropped.

    10% are empty (the unconditional branch of classifier-free guidance).
    """
    with_bg, without_bg, style = texts
    u = rng.random(3)
    if u[0] < 0.1:
        return ""
    content = with_bg if u[1] < 0.7 else without_bg
    return f"{content}, in {style} style" if u[2] < 0.8 else content


@torch.no_grad()
def _encode_latents(vae: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The VAE posterior (mean, std) of every image.

    Computed in every run, resumed ones too, rather than read from a cache: measured, a resumed world-sd
    run draws bit-identical steps only when the encoder has run in its process (the CPU convolution
    kernels' choices follow the process's history); a cached read left its weights 5e-4 apart after
    two steps. It costs about a minute for 24,000 renders on 2 cores.
    """
    means, stds = [], []
    for i in range(0, len(images), 256):
        post = vae.encode(to_tensor(images[i : i + 256])).latent_dist
        means.append(post.mean.numpy())
        stds.append(post.std.numpy())
    return np.concatenate(means), np.concatenate(stds)


def _sd_task(cfg: WorldTrainConfig, cache: Path) -> Task:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(cfg.vae or Path(cfg.out).parent / "vae" / "model").eval()
    tok, sched = world_tokenizer(), scheduler()
    text_encoder, unet = text_encoder_model(tok), unet_model()
    heldout_id = tok.convert_tokens_to_ids(HELDOUT_STYLE)
    heldout_row = text_encoder.get_input_embeddings().weight[heldout_id].detach().clone()
    images, _, _ = render_set(0, cfg.n_train, 64, TRAINED_STYLES, cache=cache)
    mean, std = _encode_latents(vae, images)
    texts = _scene_texts(0, cfg.n_train, TRAINED_STYLES)
    alphas = sched.alphas_cumprod
    scale = vae.config.scaling_factor

    def loss(idx: np.ndarray, g: torch.Generator) -> torch.Tensor:
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=g)))
        m, s = torch.from_numpy(mean[idx]), torch.from_numpy(std[idx])
        z0 = (m + s * torch.randn(m.shape, generator=g)) * scale
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, len(alphas), (len(idx),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ids = tok(
            [sd_caption(texts[i], rng) for i in idx],
            padding="max_length",
            truncation=True,
            max_length=tok.model_max_length,
            return_tensors="pt",
        ).input_ids
        dev = unet.device
        pred = unet(zt.to(dev), t.to(dev), text_encoder(ids.to(dev))[0]).sample
        return F.mse_loss(pred.float(), noise.to(dev))

    def save(mods: dict[str, torch.nn.Module], folder: Path) -> None:
        te = mods["text_encoder"]
        with torch.no_grad():  # the held-out style's word keeps its untrained embedding
            te.get_input_embeddings().weight[heldout_id] = heldout_row
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tok,
            unet=mods["unet"],
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)

    return Task({"unet": unet, "text_encoder": text_encoder}, loss, len(images), save, ema_decay=0.999)


def _blip_task(cfg: WorldTrainConfig, cache: Path) -> Task:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        processor = blip_processor(Path(d))
    model = blip_model(processor)
    images, _, _ = render_set(0, cfg.n_train, 64, STYLES, cache=cache)
    texts = _scene_texts(0, cfg.n_train, STYLES)
    tok, bos = processor.tokenizer, model.config.text_config.bos_token_id

    def loss(idx: np.ndarray, g: torch.Generator) -> torch.Tensor:
        x = flip_shift(to_tensor(images[idx]), g)  # [-1, 1], as the saved processor normalises
        enc = tok([f"a picture of {texts[i][0]}" for i in idx], padding="longest", return_tensors="pt")
        ids = enc.input_ids.clone()
        ids[:, 0] = bos  # generate() starts from [DEC]; train the same way
        labels = ids.masked_fill(enc.attention_mask == 0, -100)
        dev = model.device
        return model(
            pixel_values=degrade(x, g).to(dev),
            input_ids=ids.to(dev),
            attention_mask=enc.attention_mask.to(dev),
            labels=labels.to(dev),
        ).loss

    def save(mods: dict[str, torch.nn.Module], folder: Path) -> None:
        mods["blip"].save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)

    return Task({"blip": model}, loss, len(images), save)


INIT_FOLDERS = {"unet": "unet", "text_encoder": "text_encoder"}
"""Where a saved pipeline keeps each trained module (the others are the folder itself)."""


def init_weights(task: Task, folder: Path, ema: dict[str, torch.nn.Module]) -> None:
    """Load every module of `task` (and its EMA copy) from a saved model folder, safetensors only."""
    from finestyle.core.errors import UserError

    for name, module in task.modules.items():
        sub = folder / INIT_FOLDERS.get(name, "")
        if not (sub / "config.json").is_file():
            raise UserError(f"--init {str(folder)!r}: no {name} model there ({sub}/config.json is missing)")
        saved = type(module).from_pretrained(sub, use_safetensors=True)
        module.load_state_dict(saved.state_dict())
        if name in ema:
            ema[name].load_state_dict(saved.state_dict())


def _update_ema(ema: dict[str, torch.nn.Module], mods: dict[str, torch.nn.Module], decay: float) -> None:
    with torch.no_grad():
        for name, m in mods.items():
            for pe, p in zip(ema[name].parameters(), m.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)


def _save_checkpoint(
    path: Path, task: Task, ema: dict, opt: torch.optim.Optimizer, step: int, seconds: float
) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    state = {
        "modules": {k: m.state_dict() for k, m in task.modules.items()},
        "ema": {k: m.state_dict() for k, m in ema.items()},
        "opt": opt.state_dict(),
        "step": step,
        "seconds": seconds,
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, task: Task, ema: dict, opt: torch.optim.Optimizer) -> tuple[int, float]:
    state = torch.load(path, weights_only=True, map_location="cpu")
    for k, m in task.modules.items():
        m.load_state_dict(state["modules"][k])
    for k, m in ema.items():
        m.load_state_dict(state["ema"][k])
    opt.load_state_dict(state["opt"])
    return int(state["step"]), float(state.get("seconds", 0.0))


def train_world_model(cfg: WorldTrainConfig, log: Callable[[str], None] = print) -> Path:
    """Train one world model (resuming from `cfg.out` if it holds a checkpoint); return its model folder."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    builders = {"vae": _vae_task, "judge": _judge_task, "sd": _sd_task, "blip": _blip_task}
    task = builders[cfg.model](cfg, out.parent / "render-cache")
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    for m in task.modules.values():
        m.to(dev)
    ema = (
        {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in task.modules.items()}
        if task.ema_decay
        else {}
    )
    if cfg.compile:
        for m in task.modules.values():
            m.compile(dynamic=False)  # in place: the same parameters and state-dict keys
    params = [p for m in task.modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    start, before, ckpt = 0, 0.0, out / "checkpoint.pt"
    if cfg.init and not ckpt.exists():
        init_weights(task, Path(cfg.init), ema)
        log(f"{cfg.model}: weights from {cfg.init}")
    if ckpt.exists():
        start, before = _load_checkpoint(ckpt, task, ema, opt)
        log(f"resumed {cfg.model} at step {start}")
    g = torch.Generator()
    bf16 = cfg.bf16 and (
        dev.type == "cuda" or torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    )
    t0, losses, step_seconds = time.time(), [], []
    for step, idx in zip(
        range(start, cfg.steps), _batches(task.n, cfg.batch_size, cfg.seed, start), strict=False
    ):
        t_step = time.perf_counter()
        # One seed per step: a run resumed from any checkpoint draws what the uninterrupted run drew.
        g.manual_seed(cfg.seed * 1_000_003 + step)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = task.loss(idx, g)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema:
            _update_ema(ema, task.modules, min(task.ema_decay, (1 + step) / (10 + step)))
        losses.append(float(loss.detach()))
        step_seconds.append(time.perf_counter() - t_step)
        done = step + 1
        if done % 50 == 0:
            rate = (time.time() - t0) / (done - start)
            log(
                f"{cfg.model} step {done}/{cfg.steps} loss {np.mean(losses[-50:]):.4f} {rate:.2f}s/step "
                f"eta {duration(rate * (cfg.steps - done))}"
            )
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save_checkpoint(ckpt, task, ema, opt, done, before + time.time() - t0)
    model_dir = out / "model"
    final = ema or task.modules
    for m in final.values():
        m.to("cpu")
    task.save(final, model_dir)
    report = {
        "config": asdict(cfg),
        "seconds_this_run": time.time() - t0,
        "seconds_total": before + time.time() - t0,
        "final_loss": float(np.mean(losses[-50:])) if losses else _previous_loss(out),
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": cfg.threads,
        "bf16_autocast": bf16,
        "compile": cfg.compile,
        "step_seconds": step_seconds,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return model_dir


def bench_world_step(cfg: WorldTrainConfig, n: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """N training steps of one world model, eager then compiled, each from the same seed in a fresh
    folder (a small render set: the step time does not depend on it). The first step (the compile)
    is reported apart from the median of the rest."""
    import tempfile
    from dataclasses import replace

    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        for mode in ("eager", "compiled"):
            c = replace(
                cfg,
                out=f"{d}/{mode}",
                steps=n,
                checkpoint_every=n,
                n_train=max(2 * cfg.batch_size, 64),
                init="",
                compile=mode == "compiled",
            )
            train_world_model(c, log=lambda m: None)
            t = json.loads((Path(c.out) / "report.json").read_text())["step_seconds"]
            rows[mode] = {"first_step_s": t[0], "steady_step_s": float(np.median(t[1:])), "steps": n}
            log(f"{cfg.model} {mode}: first step {t[0]:.2f} s, then {rows[mode]['steady_step_s']:.3f} s/step")
    out = {
        "model": cfg.model,
        "cpu": cpu_name(),
        "threads": cfg.threads,
        "batch_size": cfg.batch_size,
        **rows,
    }
    out["compiled_speedup"] = rows["eager"]["steady_step_s"] / rows["compiled"]["steady_step_s"]
    return out


def _previous_loss(out: Path) -> float:
    """A run that resumed at its last step trained nothing now: its loss is the earlier report's."""
    try:
        return float(json.loads((out / "report.json").read_text())["final_loss"])
    except (OSError, ValueError, KeyError):
        return float("nan")


def duration(seconds: float) -> str:
    """1h05m, 12m30s or 45s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@torch.no_grad()
def _set_vae_scaling(model: Any, images: np.ndarray) -> None:
    """scaling_factor = 1 / std of the latents, as SD's VAE config states its own."""
    z = model.encode(to_tensor(images)).latent_dist.mean
    model.register_to_config(scaling_factor=float(1.0 / z.std()))


if __name__ == "__main__":  # pragma: no cover - background runs: python -m finestyle.world.train vae DIR
    import sys

    kind, out_dir = sys.argv[1], sys.argv[2]
    extra = dict(a.split("=", 1) for a in sys.argv[3:])
    cfg = WorldTrainConfig(model=kind, out=out_dir)
    for k, v in extra.items():
        setattr(cfg, k, type(getattr(cfg, k))(v))
    train_world_model(cfg, log=lambda s: print(s, flush=True))
