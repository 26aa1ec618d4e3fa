"""Training the world's builtin models from a seed: resumable, checkpointed, with progress.

Each model is a standard diffusers/transformers class, saved with `save_pretrained` (safetensors),
so the project's ordinary loading code reads it as it reads real weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import JUDGE_LABELS, render_set
from .scene import STYLES


@dataclass
class WorldTrainConfig:
    """One world model's training run."""

    model: str = "vae"
    """vae | judge (sd and blip follow)."""
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


def vae_model():
    """The world's AutoencoderKL: 64 px RGB <-> 4×16×16 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )


def judge_model():
    """The world's judge: a small multi-label ResNet over objects, backgrounds and styles."""
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(
        num_channels=3,
        embedding_size=32,
        hidden_sizes=[32, 64, 128, 192],
        depths=[1, 1, 2, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=len(JUDGE_LABELS),
        id2label=dict(enumerate(JUDGE_LABELS)),
        label2id={n: i for i, n in enumerate(JUDGE_LABELS)},
        problem_type="multi_label_classification",
    )
    return ResNetForImageClassification(cfg)


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
    post = model.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
    rec = model.decode(z).sample
    l1 = (rec - x).abs().mean()
    grad = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
    kl = post.kl().mean() / x[0].numel()
    return l1 + 0.5 * grad + 1e-4 * kl


def _judge_loss(model, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    logits = model(pixel_values=degrade(x, g)).logits
    return F.binary_cross_entropy_with_logits(logits, y)


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


def train_world_model(cfg: WorldTrainConfig, log: Callable[[str], None] = print) -> Path:
    """Train one world model (resuming from `cfg.out` if it holds a checkpoint); return its model folder."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = {"vae": vae_model, "judge": judge_model}[cfg.model]()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    start, ckpt = 0, out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        log(f"resumed {cfg.model} at step {start}")
    images, labels, _ = render_set(0, cfg.n_train, 64, STYLES, cache=out.parent / "render-cache")
    g = torch.Generator().manual_seed(cfg.seed + start)
    t0, losses = time.time(), []
    for step, idx in zip(
        range(start, cfg.steps), _batches(cfg.n_train, cfg.batch_size, cfg.seed, start), strict=False
    ):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        x = to_tensor(images[idx])
        if cfg.model == "vae":
            loss = _vae_loss(model, x, g)
        else:
            loss = _judge_loss(model, x, torch.from_numpy(labels[idx]), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        done = step + 1
        if done % 50 == 0:
            rate = (time.time() - t0) / (done - start)
            log(f"{cfg.model} step {done}/{cfg.steps} loss {np.mean(losses[-50:]):.4f} {rate:.2f}s/step")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            tmp = out / f".checkpoint.{os.getpid()}.pt"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done}, tmp)
            os.replace(tmp, ckpt)
    model_dir = out / "model"
    if cfg.model == "vae":
        _set_vae_scaling(model, images[:512])
    model.save_pretrained(model_dir, safe_serialization=True)
    report = {
        "config": asdict(cfg),
        "seconds_this_run": time.time() - t0,
        "final_loss": float(np.mean(losses[-50:] or [0])),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return model_dir


@torch.no_grad()
def _set_vae_scaling(model, images: np.ndarray) -> None:
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
