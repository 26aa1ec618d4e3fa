"""`PrepareConfig`: stage 1, references to a concept dataset."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from finestyle.config.base import check as _check
from finestyle.config.base import unkeyed

DEFAULT_STYLE = "flat pastel paper-cut illustration"


@dataclass
class PrepareConfig:
    """Stage 1: reference images -> concept crops -> captions -> dataset."""

    images: list[str] = unkeyed(factory=lambda: ["data/examples"])
    """Image files, folders (searched recursively) or glob patterns."""
    style: str = DEFAULT_STYLE
    """The style descriptor, e.g. "watercolor painting"; fills `{style}` in the template."""
    out: str = unkeyed("data/prepared/examples")
    """Output dataset folder (published atomically)."""
    captioner: str = "builtin:tiny-blip"
    """BLIP model: hub id (Salesforce/blip-image-captioning-base), local folder or builtin."""
    base: str | None = "builtin:tiny-sd"
    """Text-to-image model whose cross-attention locates concepts (needed for `attention`)."""
    concepts: str = "auto"
    """attention | grid | boxes | none | auto (attention when `base` is set, else grid)."""
    concept_words: list[str] = field(default_factory=list)
    """Extra concept phrases to localise in every image, e.g. ["boat", "lake"]."""
    boxes: str | None = None
    """JSON file for `concepts=boxes`: {"image.png": [{"concept": "boat", "bbox": [x0,y0,x1,y1]}]}."""
    full_image: bool = True
    """Keep each whole image as one pair (concept "the whole scene")."""
    background: bool = True
    """Add the complement of the found concepts as a `background` pair (attention method)."""
    max_concepts: int = 6
    """Most concept crops per image (full image and background not counted)."""
    min_crop: int = 48
    """Smallest crop side in pixels; smaller boxes are grown around their centre to this."""
    margin: float = 0.08
    """Margin added around each box, as a fraction of the box size."""
    concept_share: list[float] = field(default_factory=lambda: [0.6, 0.3])
    """Most of a crop's side its concept may fill, one crop per value: the default [0.6, 0.3] gives each
    concept two crops, with context around it (the recipe study's choice; docs/findings/recipe.md);
    [1.0]: the concept's box plus `margin` only, as before the study."""
    max_upscale: float = 0.0
    """Largest factor a crop may be enlarged by to reach the training resolution: a smaller crop grows
    around its concept, within the image (0: no limit)."""
    name_covered: float = 0.0
    """Name in a crop's text every other concept with at least this share of its box inside the crop
    ("red cat and blue car, in STYLE style"); 0: the crop's own concept only."""
    min_image_side: int = 64
    """Images whose shorter side is under this are rejected (too small to crop concepts from)."""
    max_pixels: int = 40_000_000
    """Decompression-bomb limit: larger images are rejected, never decoded."""
    animated: str = "first"
    """Policy for animated GIF/WebP/APNG: `first` frame only, or `skip` the file."""
    resolution: int = 512
    """Training resolution recorded per row; with it each crop gets an aspect bucket."""
    batch_size: int = 8
    """Captioning batch size."""
    caption_prefix: str = "a picture of"
    """Conditional prompt for BLIP; removed from the caption afterwards. Empty: unconditional."""
    num_beams: int = 3
    """Beam search width for captioning (1 = greedy)."""
    min_length: int = 3
    """Fewest new caption tokens."""
    max_length: int = 20
    """Most new caption tokens."""
    repetition_penalty: float = 1.3
    """>1 discourages BLIP's repeated words."""
    no_repeat_ngram_size: int = 2
    """Forbid repeating n-grams of this size in a caption (0 = off)."""
    template: str = "{concept}, in {style} style"
    """Training text; placeholders {concept}, {caption}, {style}."""
    attention_timestep: int = 400
    """Noise timestep (of 1000) at which cross-attention maps are read (DAAM-style localisation reads 300-500)."""
    threshold: float = 0.5
    """Attention threshold as a fraction of the map's max; 0 means Otsu."""
    grid_scales: list[int] = field(default_factory=lambda: [2, 3])
    """For `grid`: the n×n grids proposed besides the whole image and the centre crop."""
    device: str = unkeyed("auto")
    """cuda | mps | cpu | auto."""
    dtype: str = "auto"
    """Captioner dtype: fp32 | bf16 | fp16 | auto (fp32 on CPU)."""
    seed: int = 0
    """Seed for the noise used in attention localisation."""
    force: bool = unkeyed(False)
    """Rebuild even if an identical dataset (same inputs and config) is already there."""

    def __post_init__(self) -> None:
        if isinstance(self.images, str):
            self.images = [self.images]
        if isinstance(self.concept_words, str):
            self.concept_words = [w.strip() for w in self.concept_words.split(",") if w.strip()]
        _check(bool(self.images), "prepare.images", self.images, "give at least one file/folder/glob")
        _check(
            bool(self.style.strip()),
            "prepare.style",
            self.style,
            "name the style, e.g. 'watercolor painting'",
        )
        _check(
            self.concepts in ("auto", "attention", "grid", "boxes", "none"),
            "prepare.concepts",
            self.concepts,
            "use attention, grid, boxes, none or auto",
        )
        if self.concepts == "attention":
            _check(bool(self.base), "prepare.base", self.base, "`attention` needs --base MODEL")
        if self.concepts == "boxes":
            _check(bool(self.boxes), "prepare.boxes", self.boxes, "`boxes` needs --boxes FILE.json")
        _check(self.animated in ("first", "skip"), "prepare.animated", self.animated, "use first or skip")
        _check(self.max_concepts >= 0, "prepare.max_concepts", self.max_concepts, "must be >= 0")
        _check(8 <= self.min_crop <= 4096, "prepare.min_crop", self.min_crop, "must be 8..4096")
        _check(0 <= self.margin <= 1, "prepare.margin", self.margin, "must be within 0..1")
        _check(
            bool(self.concept_share) and all(0.05 <= v <= 1 for v in self.concept_share),
            "prepare.concept_share",
            self.concept_share,
            "give one or more shares within 0.05..1",
        )
        _check(
            self.max_upscale == 0 or self.max_upscale >= 1,
            "prepare.max_upscale",
            self.max_upscale,
            "must be 0 (no limit) or >= 1",
        )
        _check(0 <= self.name_covered <= 1, "prepare.name_covered", self.name_covered, "must be within 0..1")
        _check(self.min_image_side >= 16, "prepare.min_image_side", self.min_image_side, "must be >= 16")
        _check(self.max_pixels >= 1 << 16, "prepare.max_pixels", self.max_pixels, "must be >= 65536")
        _check(
            self.resolution % 64 == 0 and self.resolution > 0,
            "prepare.resolution",
            self.resolution,
            "must be a positive multiple of 64",
        )
        _check(self.batch_size >= 1, "prepare.batch_size", self.batch_size, "must be >= 1")
        _check(self.num_beams >= 1, "prepare.num_beams", self.num_beams, "must be >= 1")
        _check(
            1 <= self.min_length <= self.max_length,
            "prepare.min_length/max_length",
            (self.min_length, self.max_length),
            "need 1 <= min_length <= max_length",
        )
        _check(
            self.repetition_penalty >= 1.0,
            "prepare.repetition_penalty",
            self.repetition_penalty,
            "must be >= 1.0",
        )
        _check(
            "{concept}" in self.template or "{caption}" in self.template,
            "prepare.template",
            self.template,
            "must contain {concept} or {caption}",
        )
        bad = set(re.findall(r"{(\w*)}", self.template)) - {"concept", "caption", "style"}
        _check(not bad, "prepare.template", self.template, "placeholders are {concept}, {caption}, {style}")
        _check(
            1 <= self.attention_timestep <= 999,
            "prepare.attention_timestep",
            self.attention_timestep,
            "must be 1..999",
        )
        _check(0 <= self.threshold < 1, "prepare.threshold", self.threshold, "must be in [0, 1); 0 = Otsu")

    @property
    def method(self) -> str:
        """The concept method actually used (`auto` resolved)."""
        if self.concepts != "auto":
            return self.concepts
        return "attention" if self.base else "grid"
