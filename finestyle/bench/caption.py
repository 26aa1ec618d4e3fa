"""`finestyle bench caption`: BLIP captioning throughput, batched against one image at a time."""

from __future__ import annotations

import time
from typing import Any

import torch

from finestyle.bench.common import random_images
from finestyle.core.models import (
    load_captioner,
    pick_device,
)
from finestyle.prepare.captioning import Captioner, CaptionSettings, caption_dtype


def bench_caption(
    captioner: str = "builtin:blip-base-random",
    n_images: int = 16,
    batch_size: int = 8,
    max_new_tokens: int = 20,
) -> dict[str, Any]:
    """Images/s of the project's captioning path (batched, bf16 where the CPU has it) against a plain
    fp32 one-at-a-time `generate` loop, on the same images, greedy, a fixed number of new tokens."""

    dev = pick_device()
    imgs = random_images(n_images)
    model32, proc = load_captioner(captioner, device=dev, dtype=torch.float32)
    # 1. baseline: one image at a time, fp32
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, num_beams=1)
    t = time.perf_counter()
    base_caps = []
    with torch.inference_mode():
        for im in imgs:
            inputs = proc(images=im, return_tensors="pt").to(dev)
            base_caps.append(proc.decode(model32.generate(**inputs, **gen)[0], skip_special_tokens=True))
    base_s = time.perf_counter() - t
    # 2. the project's path
    dt = caption_dtype(dev, "auto")
    model = model32 if dt == torch.float32 else load_captioner(captioner, device=dev, dtype=dt)[0]
    cap = Captioner(
        model,
        proc,
        CaptionSettings(
            prefix="",
            num_beams=1,
            min_length=max_new_tokens,
            max_length=max_new_tokens,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            batch_size=batch_size,
        ),
    )
    cap.raw_batch(imgs[:1])  # warm-up (also for the baseline's first call, above, paid by it)
    t = time.perf_counter()
    proj_caps = []
    for i in range(0, n_images, batch_size):
        proj_caps += cap.raw_batch(
            imgs[i : i + batch_size],
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            num_beams=1,
        )
    proj_s = time.perf_counter() - t
    same = sum(a.strip() == b.strip() for a, b in zip(base_caps, proj_caps, strict=True))
    return {
        "captioner": captioner,
        "device": str(dev),
        "images": n_images,
        "new_tokens": max_new_tokens,
        "baseline": {"mode": "fp32, one at a time", "img_per_s": n_images / base_s},
        "project": {
            "mode": f"{str(dt).replace('torch.', '')}, batches of {batch_size}",
            "img_per_s": n_images / proj_s,
        },
        "ratio": base_s / proj_s,
        "captions_identical_to_fp32": f"{same}/{n_images}",
    }
