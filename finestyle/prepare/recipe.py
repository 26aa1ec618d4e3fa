"""FineStyle's data recipe where the paper is silent: the crop cut around each concept, the concepts a
crop's text names, and a background text the model's tokenizer knows.

- A crop keeps the concept's scale: each side is at least the concept's side / `concept_share`, and
  at least `resolution / max_upscale`, so training does not enlarge a concept beyond what the
  references show (with one value per scale for multi-scale crops).
- A crop's text names every concept that it shows (`name_covered`), not only its own, so that the
  words of what is visible own those pixels.
- The background row's text is the captioner's caption of the background crop (or what the whole
  caption says beside its concepts), never a bare word the text encoder does not know.
"""

from __future__ import annotations

from typing import Any

from finestyle.config import PrepareConfig
from finestyle.core.geometry import Box, context_crop
from finestyle.prepare.concepts import Region


def concept_crops(regions: list[Region], image_size: tuple[int, int], cfg: PrepareConfig) -> list[Region]:
    """One region per concept and share value, each with the crop that the recipe cuts around it.

    The background and grid regions are crops already (their box is what they show); concept boxes
    (attention, boxes) get context by `margin`, `concept_share`, `min_crop` and `max_upscale`.
    """
    min_side = float(cfg.min_crop)
    if cfg.max_upscale:
        min_side = max(min_side, cfg.resolution / cfg.max_upscale)
    out = []
    for r in regions:
        if r.method in ("grid", "full", "background") or r.concept == "background":
            out.append(Region(r.concept, r.bbox, r.method, r.score, dict(r.extra), crop=r.bbox))
            continue
        shares = sorted(set(cfg.concept_share), reverse=True)
        for share in shares:
            crop = context_crop(r.bbox, image_size, margin=cfg.margin, share=share, min_side=min_side)
            extra = {**r.extra, "share": share} if len(shares) > 1 else dict(r.extra)
            out.append(Region(r.concept, r.bbox, r.method, r.score, extra, crop=crop))
    return out


def share_inside(box: Box, crop: Box) -> float:
    """The share of `box`'s area that lies inside `crop`."""
    ix = max(0, min(box[2], crop[2]) - max(box[0], crop[0]))
    iy = max(0, min(box[3], crop[3]) - max(box[1], crop[1]))
    return ix * iy / max(1, (box[2] - box[0]) * (box[3] - box[1]))


def named_concepts(region: Region, regions: list[Region], min_share: float) -> list[str]:
    """The concepts a crop's text names: its own first, then (with `min_share` > 0) every other concept
    with at least that share of its box inside the crop, each once."""
    names = [region.concept]
    if min_share <= 0 or region.crop is None or region.method in ("full", "grid"):
        return names
    for other in regions:
        if other.method in ("full", "grid", "background") or other.concept in ("background", *names):
            continue
        if share_inside(other.bbox, region.crop) >= min_share:
            names.append(other.concept)
    return names


def join_concepts(names: list[str]) -> str:
    """ "red cat", "red cat and blue car", "red cat, blue car and sun"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def known_text(tokenizer: Any, text: str) -> bool:
    """Whether every word of `text` is in the tokenizer's vocabulary (no unknown token)."""
    if tokenizer is None or not text.strip():
        return bool(text.strip())
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return True
    # only what the text encoder reads (its window), which also keeps a long caption from warning
    limit = getattr(tokenizer, "model_max_length", None) or 77
    ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=min(limit, 4096))["input_ids"]
    return unk not in ids


def caption_remainder(caption: str, concepts: list[str]) -> str:
    """What a whole-image caption says beside its concepts: "a red boat over the sea" without "red
    boat" -> "the sea" (leading link words dropped)."""
    text = f" {caption} "
    for c in sorted(concepts, key=len, reverse=True):
        text = text.replace(f" {c} ", " | ")
    parts = [p.split() for p in text.split("|")]
    links = {"a", "an", "and", "on", "in", "over", "under", "with", "by", "at", "near", ","}
    best = []
    for words in parts:
        while words and words[0] in links:
            words = words[1:]
        if len(words) > len(best):
            best = words
    return " ".join(best)


def background_text(crop_caption: str, whole_caption: str, concepts: list[str], tokenizer: Any) -> str | None:
    """The background row's concept text: the captioner's words for the background crop, else the
    whole caption's remainder beside its concepts; None when neither is known to the tokenizer (the row
    is then dropped, and reported)."""
    for text in (crop_caption.strip(), caption_remainder(whole_caption, concepts)):
        if text and known_text(tokenizer, text):
            return text
    return None
