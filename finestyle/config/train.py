"""`TrainConfig`: stage 2, the adapter's training run, and the target presets (FineStyle's K/V and the
baselines).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from finestyle.config.base import check as _check
from finestyle.config.base import unkeyed
from finestyle.core.errors import UserError

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

_JOINT = r"(.*\.)?transformer_blocks\.\d+\.attn\."
MMDIT_TARGET_PRESETS = {
    # FineStyle on SD 3.x / FLUX.1: the text stream's K/V in every joint (double-stream) block. FLUX's
    # single-stream blocks share one K/V projection between text and image tokens: never targeted.
    "kv": _JOINT + r"(add_k_proj|add_v_proj)$",
    "qkvo": _JOINT + r"(add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
    # every attention projection, both streams (and FLUX's single-stream blocks' q/k/v)
    "attn": _JOINT + r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
    # every Linear of every transformer block (attention, MLPs, modulation): the broadest LoRA
    "all-linear": r"(.*\.)?(single_)?transformer_blocks\.\d+\..+",
}
"""The presets' meaning on an MMDiT (`finestyle.core.mmdit`); `kv-up0*` are UNet-only."""


def target_regex_for(targets: str, family: str) -> str:
    """The module regex a `targets` preset (or regex) means for a model family."""
    from finestyle.core.sd import MMDIT

    if family in MMDIT:
        if targets.startswith("kv-up0"):
            raise UserError(
                f"train.targets: {targets!r} names UNet blocks; SD 3.x and FLUX take kv, qkvo, attn or all-linear"
            )
        return MMDIT_TARGET_PRESETS.get(targets, targets)
    return TARGET_PRESETS.get(targets, targets)


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
    """Training resolution (pixel area ~ resolution², aspect buckets in multiples of the VAE factor, 8 px,
    at the aspect nearest each row's, so a centre crop cuts little); default:
    the base model's native size (UNet sample_size x VAE factor: 512 for SD 1.5, 1024 for SDXL)."""
    buckets: bool = True
    """Use the dataset's aspect buckets; off: centre-crop every image to a square."""
    whole_image_weight: float = 1.0
    """How often a whole reference image is drawn per epoch, against once for each crop (0: crops
    only; 3: each whole image three times)."""
    flip: bool = False
    """Random horizontal flips (latents cached for both orientations)."""
    caption_dropout: float = 0.1
    """Probability of training on the empty text (keeps classifier-free guidance working)."""
    t5: bool = True
    """SD 3.x: condition on T5 too. Off: CLIP-L and CLIP-G only (T5's part is zeros, as SD 3.5 allows);
    T5-XXL is 4.7 B parameters, about 19 GB in fp32, never loaded then."""
    flux_guidance: float = 1.0
    """FLUX.1-dev only: the distilled guidance input while training (1.0, as ai-toolkit and kohya train
    style LoRAs on dev; diffusers' script uses 3.5)."""
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
    """no | fp16 | bf16 | auto (bf16 on GPUs that have it, else fp16; on a CPU, bf16 where it has bf16
    units (AMX / AVX-512 BF16), else fp32)."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the UNet."""
    compile: str = unkeyed("off")
    """torch.compile the UNet's forward and backward (inductor): on | off. The first step of each
    bucket shape pays the compile (report.json: `first_step_seconds` apart from `steady_step_seconds`);
    losses match eager within float noise. Off by default: on a 2-core AVX2 CPU it measured only
    1.06-1.18x faster after minutes of compiling; on an H100 (SD 1.5, 512 px, bf16) 1.24x after a 74 s
    compile, which pays off only past about 3,000 steps."""
    channels_last: bool = unkeyed(False)
    """Hold the UNet and its inputs in channels-last memory format (oneDNN's and cuDNN's preferred
    layout for convolutions)."""
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
    report_to: str = unkeyed("none")
    """Trackers, through accelerate's: none | tensorboard | mlflow | tensorboard,mlflow. They get loss,
    learning rate and steps/s per step, the sample grids, the config as hyperparameters and the
    dataset's and base model's content keys as tags; `--resume` continues the same tracked run."""
    tracking_uri: str = unkeyed("")
    """Where trackers write: TensorBoard's log folder (default OUT/tracking), MLflow's tracking URI
    (default $MLFLOW_TRACKING_URI, else a SQLite store in OUT/mlflow.db)."""
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
        _check(
            0 <= self.whole_image_weight <= 100,
            "train.whole_image_weight",
            self.whole_image_weight,
            "must be within 0..100",
        )
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
        _check(self.compile in ("on", "off"), "train.compile", self.compile, "use on or off")
        _check(self.cache in ("memory", "disk"), "train.cache", self.cache, "use memory or disk")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, "must be >= 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _check(self.sample_every >= 0, "train.sample_every", self.sample_every, "must be >= 0")
        _check(self.sample_steps >= 1, "train.sample_steps", self.sample_steps, "must be >= 1")
        bad = {t.strip() for t in self.report_to.split(",")} - {"none", "tensorboard", "mlflow", ""}
        _check(
            not bad, "train.report_to", self.report_to, "use none, tensorboard, mlflow or tensorboard,mlflow"
        )
        if self.targets not in TARGET_PRESETS and self.targets not in MMDIT_TARGET_PRESETS:
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
