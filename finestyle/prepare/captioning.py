"""BLIP captioning: batched, conditional prefix, beam search, repetition control, cleaning."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from finestyle.core.env import cpu_has_bf16
from finestyle.core.models import pick_dtype

# BLIP-base's well-known artefact words (it learnt them from noisy web captions).
_ARTEFACTS = {"arafed", "araffe", "arafe", "araffed", "there is", "there are"}


def caption_dtype(device: torch.device, prefer: str = "auto") -> torch.dtype:
    """Captioning dtype: `auto` is bf16 on CPUs with native bf16, fp16 on GPU, else fp32.

    Captioning is inference only, and bf16 captions were measured against fp32 (README), so
    unlike training the CPU default here is reduced precision where the hardware has it.
    """

    if prefer != "auto":
        return pick_dtype(device, prefer)
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float16


def clean_caption(text: str, prefix: str = "") -> str:
    """Strip the conditional prefix, BLIP artefacts, repeated words and stray whitespace."""
    t = " ".join(text.strip().lower().split())
    p = " ".join(prefix.strip().lower().split())
    if p and t.startswith(p):
        t = t[len(p) :].strip()
    for a in _ARTEFACTS:
        t = re.sub(rf"\b{a}\b", " ", t)
    words = t.split()
    dedup: list[str] = []
    for w in words:  # "a boat boat on on the lake" -> "a boat on the lake"
        if not dedup or dedup[-1] != w:
            dedup.append(w)
    t = " ".join(dedup)
    t = re.sub(r"\s+([,.;:])", r"\1", t).strip(" ,.;:")
    return t


@dataclass
class CaptionSettings:
    prefix: str = "a picture of"
    num_beams: int = 3
    min_length: int = 3
    max_length: int = 20
    repetition_penalty: float = 1.3
    no_repeat_ngram_size: int = 2
    batch_size: int = 8


class Captioner:
    """Wraps a BLIP model + processor; `caption(images)` returns cleaned captions in order."""

    def __init__(self, model: Any, processor: Any, settings: CaptionSettings | None = None) -> None:
        self.model = model
        self.processor = processor
        self.s = settings or CaptionSettings()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def raw_batch(
        self,
        images: list[Image.Image],
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        num_beams: int | None = None,
    ) -> list[str]:
        """Caption one batch (no cleaning). Conditional on the prefix when one is set."""
        s = self.s
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if s.prefix:
            kwargs["text"] = [s.prefix] * len(images)
        inputs = self.processor(**kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        gen = dict(
            max_new_tokens=max_new_tokens or s.max_length,
            min_new_tokens=min_new_tokens if min_new_tokens is not None else s.min_length,
            num_beams=num_beams or s.num_beams,
            repetition_penalty=s.repetition_penalty,
        )
        if s.no_repeat_ngram_size:
            gen["no_repeat_ngram_size"] = s.no_repeat_ngram_size
        out = self.model.generate(**inputs, **gen)
        return self.processor.batch_decode(out, skip_special_tokens=True)

    def caption(self, images: list[Image.Image]) -> list[str]:
        """Caption any number of images in batches of `batch_size`; returns cleaned captions."""
        out: list[str] = []
        for i in range(0, len(images), self.s.batch_size):
            batch = self.raw_batch(images[i : i + self.s.batch_size])
            out.extend(clean_caption(t, self.s.prefix) for t in batch)
        return out
