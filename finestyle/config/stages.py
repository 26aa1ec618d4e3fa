"""One configuration dataclass per stage, and the pipeline file that holds them all.

`__post_init__` only validates (no side effects: Prefect rebuilds parameters and re-runs it). Each
error names the field, the bad value and what is allowed. A YAML file holds a whole pipeline:

    workdir: runs/my-style
    prepare: {images: [data/examples], style: watercolor painting}
    train: {steps: 500, rank: 8}
    export: {optimize: true}

CLI options override file values (`apply_overrides`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from finestyle.config.base import check as _check
from finestyle.config.base import from_dict, load_yaml, unkeyed
from finestyle.core.errors import UserError

T = TypeVar("T")

DEFAULT_STYLE = "flat pastel paper-cut illustration"
TARGET_PRESETS = {
    # FineStyle's choice: cross-attention key/value only (paper, Sec. 3.2).
    "kv": r".*attn2\.(to_k|to_v)$",
    "qkvo": r".*attn2\.(to_q|to_k|to_v|to_out\.0)$",
    # diffusers' train_text_to_image_lora.py default: self- and cross-attention.
    "attn": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    # FineStyle on a subset, for SDXL: K/V of the first up level's transformer blocks, where B-LoRA
    # and InstantStyle locate style (up_blocks.0 has no attention in SD 1.x/2.x: nothing to train).
    "kv-up0": r".*up_blocks\.0\.attentions\.\d+\..*attn2\.(to_k|to_v)$",
    # ... and only its second attention block: B-LoRA's style block, InstantStyle's style injection.
    "kv-up0.1": r".*up_blocks\.0\.attentions\.1\..*attn2\.(to_k|to_v)$",
}


# Sampler names accepted by `generate --scheduler` and the server (diffusers classes, configured from
# the model's scheduler_config.json so the noise schedule stays the model's).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD1.5 ships it
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


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


@dataclass
class TrainConfig:
    """Stage 2: LoRA adapters on the UNet from a prepared dataset."""

    dataset: str = unkeyed("data/prepared/examples")
    """Dataset folder from `prepare`, or an ImageFolder with train/metadata.jsonl."""
    base: str = unkeyed("builtin:tiny-sd")
    """Base text-to-image model: hub id, local diffusers folder or builtin."""
    out: str = unkeyed("runs/train")
    """Output folder: adapter/, checkpoints/, samples/, loss.png, report.json."""
    targets: str = "kv"
    """kv (attn2 K/V, FineStyle) | qkvo (attn2 q,k,v,out) | attn (self+cross) | kv-up0, kv-up0.1 (SDXL:
    K/V of up_blocks.0 only, or its style block) | a regex."""
    rank: int = 8
    """LoRA rank."""
    alpha: float | None = None
    """LoRA alpha; default = rank (scale 1)."""
    dropout: float = 0.0
    """LoRA dropout."""
    init: str = "gaussian"
    """LoRA init: gaussian | default (kaiming A, zero B). (PiSSA-style inits rewrite the base
    weights, which would break merge/export against the base model, so they are not offered.)"""
    steps: int = 500
    """Optimizer steps."""
    lr: float = 1e-4
    """Learning rate (StyleDrop found >3e-5 overfits content with its adapters; LoRA likes 1e-4)."""
    batch_size: int = 1
    """Images per step (per device)."""
    grad_accum: int = 1
    """Gradient accumulation micro-steps per optimizer step."""
    resolution: int | None = None
    """Training resolution (pixel area ~ resolution², aspect buckets in multiples of 64); default:
    the base model's native size (UNet sample_size x VAE factor: 512 for SD 1.5, 1024 for SDXL)."""
    buckets: bool = True
    """Use the dataset's aspect buckets; off: centre-crop every image to a square."""
    flip: bool = False
    """Random horizontal flips (latents cached for both orientations)."""
    caption_dropout: float = 0.1
    """Probability of training on the empty text (keeps classifier-free guidance working)."""
    snr_gamma: float | None = None
    """Min-SNR loss weighting gamma (5.0 is the paper's value); None: off."""
    noise_offset: float = 0.0
    """Noise offset (e.g. 0.05) for darker/brighter images; 0: off."""
    lr_scheduler: str = "constant_with_warmup"
    """constant | constant_with_warmup | linear | cosine."""
    warmup_steps: int = 0
    """Warmup steps for the LR schedule."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    mixed_precision: str = "auto"
    """no | fp16 | bf16 | auto (bf16 on GPUs that have it, else fp16; fp32 on CPU)."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the UNet."""
    use_8bit_adam: bool = False
    """bitsandbytes AdamW8bit (GPU only)."""
    cache: str = unkeyed("memory")
    """Where cached latents/text embeddings live: memory | disk."""
    seed: int = 0
    """Seed; the same seed gives the same run."""
    checkpoint_every: int = unkeyed(0)
    """Write a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = unkeyed(2)
    """How many checkpoints to keep."""
    resume: bool = unkeyed(False)
    """Continue from the newest complete checkpoint in out/checkpoints."""
    sample_every: int = unkeyed(0)
    """Write sample grids every N steps (0: only at the end)."""
    sample_prompts: list[str] = unkeyed(factory=list)
    """Validation prompts; default: concept swaps built from the dataset."""
    sample_steps: int = unkeyed(20)
    """Denoising steps for samples."""
    sample_resolution: int | None = unkeyed(None)
    """Sample image size; default: the model's native size."""
    samples: bool = True
    """Write sample grids at all (off for benchmarks)."""
    device: str = unkeyed("auto")
    """cuda | mps | cpu | auto."""
    force: bool = unkeyed(False)
    """Retrain even if `out` holds a finished run with the same content key."""
    eval_every: int = 0
    """Score style, prompt fidelity and leakage every N steps (and at the end); 0: off."""
    eval_judge: str = "world"
    """Judge of those scores: world | world:FOLDER | clip:MODEL (as `finestyle eval --judge`)."""
    eval_prompts: int = 6
    """Prompts of the checkpoint evaluation (disjoint from those a final `finestyle eval` uses)."""
    eval_seeds: int = 2
    """Seeds per prompt (disjoint from the final evaluation's)."""
    eval_steps: int = 20
    """Denoising steps of the checkpoint evaluation."""
    select: str = "last"
    """Which weights become adapter/: last, or best (the least leakage among the evaluated steps whose
    style fidelity is within 0.05 of the best); best needs eval_every."""

    def __post_init__(self) -> None:
        _check(self.select in ("last", "best"), "train.select", self.select, "use last or best")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0")
        _check(
            self.select == "last" or self.eval_every > 0,
            "train.select",
            self.select,
            "best picks among evaluated steps: give eval_every (e.g. --eval-every 100)",
        )
        _check(
            self.eval_prompts >= 1 and self.eval_seeds >= 1, "train.eval_prompts", self.eval_prompts, ">= 1"
        )
        if isinstance(self.sample_prompts, str):
            self.sample_prompts = [self.sample_prompts]
        _check(self.rank >= 1, "train.rank", self.rank, "must be >= 1")
        _check(self.alpha is None or self.alpha > 0, "train.alpha", self.alpha, "must be > 0")
        _check(0 <= self.dropout < 1, "train.dropout", self.dropout, "must be in [0, 1)")
        _check(self.init in ("gaussian", "default"), "train.init", self.init, "use gaussian or default")
        _check(self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        _check(0 < self.lr < 1, "train.lr", self.lr, "must be in (0, 1)")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "must be >= 1")
        _check(
            self.resolution is None or (self.resolution % 8 == 0 and self.resolution >= 32),
            "train.resolution",
            self.resolution,
            "must be a multiple of 8, >= 32",
        )
        _check(
            0 <= self.caption_dropout < 1, "train.caption_dropout", self.caption_dropout, "must be in [0, 1)"
        )
        _check(
            self.snr_gamma is None or self.snr_gamma > 0,
            "train.snr_gamma",
            self.snr_gamma,
            "must be > 0 or null",
        )
        _check(
            self.lr_scheduler in ("constant", "constant_with_warmup", "linear", "cosine"),
            "train.lr_scheduler",
            self.lr_scheduler,
            "use constant, constant_with_warmup, linear, cosine",
        )
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(
            self.mixed_precision in ("auto", "no", "fp16", "bf16"),
            "train.mixed_precision",
            self.mixed_precision,
            "use auto, no, fp16 or bf16",
        )
        _check(self.cache in ("memory", "disk"), "train.cache", self.cache, "use memory or disk")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, "must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _check(self.sample_every >= 0, "train.sample_every", self.sample_every, "must be >= 0")
        _check(self.sample_steps >= 1, "train.sample_steps", self.sample_steps, "must be >= 1")
        if self.targets not in TARGET_PRESETS:
            try:
                re.compile(self.targets)
            except re.error as exc:
                raise UserError(
                    f"train.targets: {self.targets!r} is neither a preset "
                    f"({', '.join(TARGET_PRESETS)}) nor a valid regex: {exc}"
                ) from exc

    @property
    def target_regex(self) -> str:
        return TARGET_PRESETS.get(self.targets, self.targets)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


@dataclass
class ExportConfig:
    """Stage 3: merge the adapter, export ONNX (and TensorRT), prove parity."""

    base: str = unkeyed("builtin:tiny-sd")
    """Base text-to-image model the adapter was trained on."""
    adapter: str | None = unkeyed("runs/train/adapter")
    """Adapter folder from `train` (None: export the base model alone)."""
    out: str = unkeyed("exports/model")
    """Export folder: merged/, onnx/, [tensorrt/], manifest.json."""
    format: str = "onnx"
    """onnx | tensorrt (TensorRT also writes the ONNX it is built from)."""
    lora_scale: float = 1.0
    """Scale at which the adapter is fused."""
    fp16: bool = False
    """Half-precision ONNX weights/compute, inputs/outputs kept fp32; the VAE stays fp32 unless a
    probe proves its fp16 graph NaN-free and close. Meant for GPUs (CPU kernels are fp32)."""
    optimize: bool = False
    """Run onnxruntime's diffusion graph optimizer (CPU-safe fusions on CPU)."""
    with_base_unet: bool = False
    """Also export the un-adapted UNet (`onnx/unet_base`), needed for style guidance."""
    opset: int | None = None
    """ONNX opset (None: optimum's default)."""
    unet_atol: float = 1e-4
    """fp32 UNet parity: max |ORT - torch| allowed."""
    image_atol: float = 2e-3
    """Whole-image parity: max |ORT - torch| allowed, pixel values in [0, 1]."""
    merge_atol: float = 1e-4
    """Merged vs adapter UNet: max abs difference allowed (fp32)."""
    parity_steps: int = 4
    """Denoising steps of the whole-image parity check."""
    check_bf16: bool = True
    """Also measure the CPU bf16 torch path (merged/ in bf16 + channels_last) against fp32."""
    check_openvino: bool = True
    """When OpenVINO is installed, check its image against fp32 at the precision `--runtime openvino`
    picks on this CPU; recorded in the manifest (a failure marks that precision unusable, not the
    export)."""
    device: str = unkeyed("auto")
    """Device for merge and the PyTorch side of parity."""
    trt_static: bool = True
    """TensorRT: static shape profiles (faster) rather than dynamic ranges."""
    trt_refit: bool = False
    """TensorRT: build refittable engines (swap adapters without a rebuild)."""
    trt_batch: int = 1
    """TensorRT profile: images per request (UNet batch is 2x for guidance)."""
    trt_size: int | None = None
    """TensorRT profile: image side in pixels; default: the model's native size (512 SD 1.5, 1024 SDXL)."""
    force: bool = unkeyed(False)
    """Re-export even if an identical export is there."""

    def __post_init__(self) -> None:
        _check(self.format in ("onnx", "tensorrt"), "export.format", self.format, "use onnx or tensorrt")
        _check(self.lora_scale >= 0, "export.lora_scale", self.lora_scale, "must be >= 0")
        for name in ("unet_atol", "image_atol", "merge_atol"):
            _check(getattr(self, name) > 0, f"export.{name}", getattr(self, name), "must be > 0")
        _check(self.parity_steps >= 1, "export.parity_steps", self.parity_steps, "must be >= 1")
        _check(
            self.trt_size is None or self.trt_size % 8 == 0,
            "export.trt_size",
            self.trt_size,
            "must be a multiple of 8",
        )


@dataclass
class EvalConfig:
    """Evaluation: style fidelity, prompt fidelity and content leakage of a model (or of several variants)."""

    model: str = "exports/model"
    """Export folder, or a base model (hub id, folder, builtin) with `adapter`."""
    adapter: str | None = None
    """Adapter folder (RUN/adapter) on top of `model`; leakage is measured against `model` without it."""
    references: str = "data/prepared/examples"
    """The prepared dataset of the references: its concepts are what counts as leakage."""
    out: str = "runs/eval"
    """Output folder: report.json, report.md, grid.png (and guidance.png), images/."""
    prompts: str | None = None
    """Prompt file (one per line, optionally TAB superclass); default: the judge's own set."""
    judge: str = "world"
    """world | world:FOLDER | clip:MODEL (hub id, folder or builtin:tiny-clip)."""
    style: str | None = None
    """Target style text; default: the dataset's style."""
    n_prompts: int = 12
    """Prompts taken from the default set."""
    seeds: int = 4
    """Seeds per prompt."""
    steps: int = 20
    """Denoising steps."""
    guidance: float = 7.5
    """Prompt guidance λ2."""
    style_guidance: list[float] = field(default_factory=lambda: [0.0])
    """Style guidance λ1 values; several sweep the trade-off (guidance.png)."""
    batch: int = 16
    """Images per denoising batch."""
    device: str = "auto"
    """Generation and judge device: auto | cpu | cuda."""
    runtime: str = "auto"
    """Runtime of the tuned model when it is an export: auto (onnxruntime) | onnxruntime | openvino |
    torch | tensorrt. With `adapter` it is torch; the base model always runs in torch."""
    dtype: str = "auto"
    """Precision of the tuned model's runtime (torch, openvino): auto | fp32 | bf16 | fp16."""
    seed: int = 20_000_000
    """First seed (each prompt uses seed .. seed+seeds-1); keep it apart from any training seed."""
    calibration_seed: int = 35_000_000
    """First seed of the base-model images the world judge's object thresholds are calibrated on."""

    def __post_init__(self) -> None:
        _check(self.seeds >= 1, "eval.seeds", self.seeds, "at least 1")
        _check(
            abs(self.calibration_seed - self.seed) >= self.seeds,
            "eval.calibration_seed",
            self.calibration_seed,
            "seeds apart from seed .. seed+seeds-1",
        )
        _check(
            self.runtime in ("auto", "onnxruntime", "openvino", "torch", "tensorrt"),
            "eval.runtime",
            self.runtime,
            "use auto, onnxruntime, openvino, torch or tensorrt",
        )
        _check(
            self.dtype in ("auto", "fp32", "bf16", "fp16"), "eval.dtype", self.dtype, "auto|fp32|bf16|fp16"
        )
        _check(self.steps >= 1, "eval.steps", self.steps, "at least 1")
        _check(self.n_prompts >= 1, "eval.n_prompts", self.n_prompts, "at least 1")
        _check(
            all(x >= 0 for x in self.style_guidance), "eval.style_guidance", self.style_guidance, "≥ 0 each"
        )


EMPTY_PROMPT = (
    "prompt: empty; give the text to draw, e.g. 'a red boat' (the CLI and the server refuse it alike)"
)


@dataclass
class RequestOptions:
    """What one generation asks for. `generate`'s options, the runtime's request and the server's two
    request bodies all derive from these fields: their names, types, defaults and docs."""

    prompt: str = "a lighthouse on a cliff"
    """The prompt; add or remove concept words to steer what the style covers."""
    negative_prompt: str = ""
    """Negative prompt."""
    steps: int = 20
    """Denoising steps."""
    guidance: float = 7.5
    """Prompt (classifier-free) guidance weight λ2; 1 = off."""
    style_guidance: float = 0.0
    """Style guidance weight λ1: + λ1·(tuned(prompt) - base(prompt)); 0 = off."""
    width: int | None = None
    """Image width (multiple of 8); default: the model's native size."""
    height: int | None = None
    """Image height (multiple of 8); default: the model's native size."""
    seed: int = 0
    """Seed; the same seed gives the same image on the same backend."""
    num_images: int = 1
    """Images per prompt."""
    scheduler: str | None = None
    """Sampler: ddim | pndm | euler | euler_a | dpmpp_2m | dpmpp_2m_karras | unipc | ddpm (None: the model's)."""
    style: str | None = None
    """A swappable export's style (None: its default style)."""

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise UserError(
                f"generate.scheduler: unknown scheduler {self.scheduler!r}; use one of: {', '.join(SCHEDULERS)}"
            )
        if not self.prompt.strip():
            raise UserError(EMPTY_PROMPT)
        _check(1 <= self.steps <= 1000, "generate.steps", self.steps, "must be 1..1000")
        _check(self.guidance >= 0, "generate.guidance", self.guidance, "must be >= 0")
        _check(self.style_guidance >= 0, "generate.style_guidance", self.style_guidance, "must be >= 0")
        for name in ("width", "height"):
            v = getattr(self, name)
            _check(v is None or (v % 8 == 0 and v >= 8), f"generate.{name}", v, "must be a multiple of 8")
        _check(1 <= self.num_images <= 64, "generate.num_images", self.num_images, "must be 1..64")


@dataclass
class GenerateConfig(RequestOptions):
    """Inference: one or more images from an export or a model (the request options, plus where)."""

    model: str = "exports/model"
    """Export folder (verified by its manifest), or a diffusers folder / builtin for torch."""
    out: str = "generated.png"
    """Output PNG; with several images, -1, -2, ... are appended."""
    exclude_concepts: list[str] = field(default_factory=list)
    """Reference concepts to keep out; appended to the negative prompt."""
    runtime: str = "auto"
    """auto | onnxruntime | openvino | tensorrt | torch."""
    providers: list[str] | None = None
    """onnxruntime execution providers in order (default: TensorRT, CUDA, CPU as available)."""
    adapter: str | None = None
    """torch runtime: an adapter folder to load on top of `model`."""
    dtype: str = "auto"
    """torch and openvino precision: auto | fp32 | bf16 (fast CPU path) | fp16. auto: fp32 for torch
    on a CPU; bf16 for openvino where the CPU has bf16 units and the export's check passed."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.exclude_concepts, str):
            self.exclude_concepts = [w.strip() for w in self.exclude_concepts.split(",") if w.strip()]
        _check(
            self.runtime in ("auto", "onnxruntime", "openvino", "tensorrt", "torch"),
            "generate.runtime",
            self.runtime,
            "use auto, onnxruntime, openvino, tensorrt or torch",
        )
        _check(
            self.dtype in ("auto", "fp32", "bf16", "fp16"),
            "generate.dtype",
            self.dtype,
            "use auto, fp32, bf16 or fp16",
        )

    def request(self, negative_prompt: str) -> RequestOptions:
        """The runtime's request: these options, with the exclusions already in `negative_prompt`."""
        values = {f.name: getattr(self, f.name) for f in fields(RequestOptions)}
        return RequestOptions(**{**values, "negative_prompt": negative_prompt})


@dataclass
class ServeConfig:
    """The HTTP inference server: limits, queue and dynamic batching."""

    export: str = "exports/model"
    """Export folder to serve (verified by its manifest at start-up)."""
    host: str = "127.0.0.1"
    """Bind address; 127.0.0.1 unless you put it behind a gateway on purpose."""
    port: int = 8000
    """Port."""
    runtime: str = "onnxruntime"
    """onnxruntime | openvino | torch | tensorrt (the export's engines; not yet run on a GPU)."""
    providers: list[str] | None = None
    """onnxruntime execution providers in order (default: TensorRT, CUDA, CPU as available)."""
    dtype: str = "auto"
    """torch and openvino precision: auto | fp32 | bf16 (fast CPU path) | fp16."""
    max_prompt_tokens: int = 77
    """Longest prompt/negative prompt accepted, in tokenizer tokens (incl. start/end)."""
    min_steps: int = 1
    """Fewest denoising steps accepted."""
    max_steps: int = 50
    """Most denoising steps accepted."""
    max_size: int | None = None
    """Largest width/height accepted (multiples of 8); default: twice the model's native size (1024 for
    SD 1.5, 2048 for SDXL)."""
    max_images: int = 4
    """Most images per request."""
    max_body_bytes: int = 16_384
    """Largest request body accepted (413 beyond)."""
    queue_size: int = 32
    """Requests waiting at most; beyond, 503 with Retry-After."""
    max_batch: int = 8
    """Most images in one batched denoising loop."""
    max_wait_ms: float = 60.0
    """How long the batcher waits for more same-shape requests (only while there is concurrency:
    a lone client is served at once)."""
    max_gap_ms: float = 10.0
    """The batcher also stops waiting once no request has arrived for this long: a burst of
    requests is over, and waiting the rest of `max_wait_ms` would only add latency."""
    batching: bool = True
    """Dynamic batching on/off (off: one request per loop)."""
    timeout_s: float = 120.0
    """Per-request timeout (504 beyond)."""
    drain_s: float = 30.0
    """On shutdown, how long requests in flight may finish."""

    def __post_init__(self) -> None:
        _check(
            self.runtime in ("onnxruntime", "openvino", "torch", "tensorrt"),
            "serve.runtime",
            self.runtime,
            "use onnxruntime, openvino, torch or tensorrt",
        )
        _check(1 <= self.port <= 65535, "serve.port", self.port, "must be 1..65535")
        _check(
            1 <= self.min_steps <= self.max_steps,
            "serve.min_steps/max_steps",
            (self.min_steps, self.max_steps),
            "need 1 <= min_steps <= max_steps",
        )
        _check(
            self.max_size is None or (self.max_size >= 8 and self.max_size % 8 == 0),
            "serve.max_size",
            self.max_size,
            "multiple of 8",
        )
        for name in ("max_images", "max_body_bytes", "queue_size", "max_batch", "max_prompt_tokens"):
            _check(getattr(self, name) >= 1, f"serve.{name}", getattr(self, name), "must be >= 1")
        _check(self.max_wait_ms >= 0, "serve.max_wait_ms", self.max_wait_ms, "must be >= 0")
        _check(self.max_gap_ms >= 0, "serve.max_gap_ms", self.max_gap_ms, "must be >= 0")
        _check(self.timeout_s > 0, "serve.timeout_s", self.timeout_s, "must be > 0")


@dataclass
class PipelineConfig:
    """The whole DAG: prepare -> train -> export (-> one generated image)."""

    workdir: str = "runs/pipeline"
    """Folder that receives dataset/, train/, export/ unless a stage's `out` is set explicitly."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    """Stage 1 settings."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Stage 2 settings (`dataset` and `base` are filled from prepare when left default)."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Stage 3 settings (`base` and `adapter` are filled from train)."""
    generate_prompt: str | None = None
    """If set, generate one image from the export at the end."""
    eval: EvalConfig | None = None
    """Optional stage 4: evaluate the export against the prepared dataset (`model`, `references` and
    `out` are filled from the other stages when left default)."""
    task_runner: str = "default"
    """Prefect task runner for mapped prepare work: default (threads) | dask."""

    def __post_init__(self) -> None:
        _check(
            self.task_runner in ("default", "dask"), "task_runner", self.task_runner, "use default or dask"
        )


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML and apply `section.key=value` overrides (CLI wins over the file)."""
    data = load_yaml(path)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected section.key=value, e.g. train.steps=100")
        key, value = item.split("=", 1)
        import yaml

        parsed = yaml.safe_load(value) if value else value
        parts = key.split(".")
        cur = data
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
            if not isinstance(cur, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
        cur[parts[-1]] = parsed
    return from_dict(PipelineConfig, data)
