"""Reading pictures with the world's judge, and drawing them with a text-to-image pipeline, in batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import BACKGROUND_SLICE, OBJECT_SLICE, STYLE_SLICE
from .scene import BACKGROUNDS, OBJECTS, STYLES

OBJECT_THRESHOLD = 0.5


@dataclass
class Reading:
    """What the judge sees in one image."""

    objects: set[str]
    background: str
    style: str
    style_probs: dict[str, float]


def as_array(images: list[Image.Image] | np.ndarray, size: int = 64) -> np.ndarray:
    """uint8 (n, size, size, 3) from PIL images (resized when needed) or an array."""
    if isinstance(images, np.ndarray):
        return images
    out = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images]
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


@torch.inference_mode()
def judge_probs(judge: Any, images: list[Image.Image] | np.ndarray, batch: int = 256) -> np.ndarray:
    """Per image: sigmoid of the judge's logits over JUDGE_LABELS (objects, backgrounds, styles)."""
    arr = as_array(images)
    dev = next(judge.parameters()).device
    probs = []
    for i in range(0, len(arr), batch):
        x = torch.from_numpy(arr[i : i + batch]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        probs.append(torch.sigmoid(judge(pixel_values=x.to(dev)).logits.float()).cpu().numpy())
    return np.concatenate(probs) if probs else np.zeros((0, STYLE_SLICE.stop), np.float32)


def read(probs: np.ndarray) -> list[Reading]:
    """Objects above OBJECT_THRESHOLD; background and style by argmax."""
    out = []
    for p in probs:
        objs = {OBJECTS[i] for i, v in enumerate(p[OBJECT_SLICE]) if v >= OBJECT_THRESHOLD}
        st = p[STYLE_SLICE]
        out.append(
            Reading(
                objs,
                list(BACKGROUNDS)[int(np.argmax(p[BACKGROUND_SLICE]))],
                STYLES[int(np.argmax(st))],
                {s: float(v) for s, v in zip(STYLES, st, strict=True)},
            )
        )
    return out


@torch.inference_mode()
def generate(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance: float = 7.5,
    batch: int = 64,
    progress: Any = None,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, batched; each image depends only on its own seed."""
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i : i + batch], seeds[i : i + batch]
        gens = [torch.Generator("cpu").manual_seed(s) for s in ss]
        out = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
        images.extend(out)
        if progress:
            progress(len(images), len(prompts))
    return images
