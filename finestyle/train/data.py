"""Training data: aspect buckets, crops to a bucket, the seeded data order, and the latent/text caches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from finestyle.config import TrainConfig
from finestyle.core.geometry import bucket_size
from finestyle.core.sd import (
    encode_texts,
    pack_cond,
)


@dataclass
class Example:
    text_id: int
    size: tuple[int, int]  # (w, h) of the training bucket
    latent_ids: tuple[int, ...]  # cache ids: (plain,) or (plain, flipped)
    # SDXL's micro-conditioning: (original h, w, crop top, left, target h, w); unused by SD 1.x/2.x
    time_ids: tuple[int, ...] = ()
    whole: bool = False  # a whole reference image (the `full` row), weighted by whole_image_weight


def bucket_of(
    image_size: tuple[int, int], cfg: TrainConfig, resolution: int | None = None, step: int = 8
) -> tuple[int, int]:
    """The (w, h) training bucket of an image, in multiples of `step` (the VAE factor); `resolution`
    overrides cfg's (the model's native size when cfg leaves it unset)."""
    res = resolution or cfg.resolution or 512
    if not cfg.buckets:
        return (res, res)
    return bucket_size(image_size, res, step)


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


def epoch_batches(
    examples: list[Example], batch_size: int, seed: int, epoch: int, whole_weight: float = 1.0
) -> list[list[int]]:
    """The batches of one epoch: a seeded shuffle, grouped so a batch holds one bucket size.

    A whole image appears `whole_weight` times per epoch on average (the integer part each epoch, the
    fraction by a seeded draw), every other row once. Pure function of (seed, epoch): resume needs only
    the epoch and the position within it.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    pool = list(range(len(examples)))
    if whole_weight != 1.0:
        draws = torch.rand(len(examples), generator=g).tolist()
        pool = [
            i
            for i, ex in enumerate(examples)
            for _ in range(int(whole_weight) + (draws[i] < whole_weight % 1) if ex.whole else 1)
        ] or pool
    order = [pool[k] for k in torch.randperm(len(pool), generator=g).tolist()]
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
    step = int(getattr(pipe, "vae_scale_factor", 8))
    if getattr(pipe, "unet", None) is None:  # SD 3.x / FLUX.1: whole 2x2 latent patches
        from finestyle.core.mmdit import bucket_step

        step = bucket_step(pipe)
    for r in rows:
        size = bucket_of(r["image"].size, cfg, resolution, step)
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
        examples.append(Example(text_index[r["text"]], size, tuple(ids), tids, r.get("method") == "full"))
    return examples, latents, text_emb
