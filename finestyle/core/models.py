"""Model loading (hub id, local folder or builtin name) and the builtin random-weight presets.

Every model argument in FineStyle goes through `load_sd_pipeline` or `load_captioner`. The same
code path loads `stable-diffusion-v1-5/stable-diffusion-v1-5` on a connected machine, a local
diffusers folder, or `builtin:tiny-sd` built offline from a config. Weights are read from
safetensors only and remote code is never trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finestyle.core.env import quiet_progress_bars
from finestyle.core.errors import ModelLoadError, UserError
from finestyle.core.fs import hash_json, hash_tree, sha256_file, staging_dir
from finestyle.core.sd import SD, SDXL, family_of_class, folder_family

BUILTIN_PREFIX = "builtin:"

# Words the tiny BLIP's BERT vocabulary knows. A random-weight captioner then "says" plausible
# visual phrases, which keeps the downstream concept code exercised by real strings.
_BLIP_WORDS = (
    "a an the of with and on in at near under over by its two three painting photograph picture drawing "
    "red blue green yellow orange purple white black brown pink golden small large big tall round "
    "boat lake tree trees house sun moon sky cloud clouds mountain mountains hill river flower flowers "
    "cat dog bird fish car road bridge field grass leaves forest sea beach rock rocks window door "
    "person woman man child girl boy table chair cup vase fruit apple bowl background texture pattern"
).split()

# --------------------------------------------------------------------------------------------
# device and dtype


def pick_device(prefer: str | None = None) -> torch.device:
    """Return `prefer` if given, else the best available device: cuda > mps > cpu."""
    if prefer and prefer != "auto":
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, prefer: str | None = None) -> torch.dtype:
    """fp32 on CPU; fp16 on cuda/mps unless `prefer` names one (fp32, fp16, bf16)."""
    if prefer and prefer != "auto":
        names = {
            "fp32": torch.float32,
            "float32": torch.float32,
            "fp16": torch.float16,
            "float16": torch.float16,
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
        }
        if prefer not in names:
            raise UserError(f"dtype: unknown value {prefer!r}; use one of fp32, fp16, bf16, auto")
        return names[prefer]
    return torch.float32 if device.type == "cpu" else torch.float16


@contextlib.contextmanager
def quiet_hf_logs() -> Iterator[None]:
    """Silence diffusers/transformers loggers during a load: we report failures ourselves."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    old = (dlog.get_verbosity(), tlog.get_verbosity())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(old[0])
        tlog.set_verbosity(old[1])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch inside a forked RNG so building a builtin never disturbs the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------
# tokenizers built offline


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-unicode table that CLIP's BPE uses (openai/CLIP simple_tokenizer.py).
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_byte_clip_tokenizer(folder: Path) -> None:
    """Write a real CLIPTokenizer over the 256 byte characters (+ `</w>` forms), no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)


BLIP_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def build_blip_processor(
    folder: Path,
    image_size: int,
    words: list[str],
    max_length: int = 64,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> Any:
    """A real BlipProcessor: BERT word-piece tokenizer over `words` (+ specials, "." and ","), image processor.

    `image_mean`/`image_std` default to BLIP's own (CLIP's); the vocabulary is written to `folder`.
    """
    from transformers import BertTokenizerFast, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    vocab = BLIP_SPECIAL_TOKENS + list(dict.fromkeys(list(words) + [".", ","]))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(
        vocab_file=str(folder / "vocab.txt"),
        do_lower_case=True,
        bos_token="[DEC]",
        model_max_length=max_length,
    )
    norm = {k: v for k, v in (("image_mean", image_mean), ("image_std", image_std)) if v is not None}
    ip = BlipImageProcessor(size={"height": image_size, "width": image_size}, **norm)
    return BlipProcessor(image_processor=ip, tokenizer=tok)


def blip_text_ids(tok: Any) -> dict[str, int]:
    """The special-token ids a BLIP text config needs from its tokenizer (decoding starts at [DEC])."""
    return dict(
        bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        eos_token_id=tok.sep_token_id,
        sep_token_id=tok.sep_token_id,
        pad_token_id=tok.pad_token_id,
    )


# --------------------------------------------------------------------------------------------
# builtin presets


def _tiny_vae() -> Any:
    """The tiny builtins' VAE: two levels (2x downsampling), 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
        norm_num_groups=32,
    )


def _sd_vae(**config: Any) -> Any:
    """Stable Diffusion's VAE architecture (8x downsampling, 84M parameters), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        norm_num_groups=32,
        **config,
    )


def _tiny_sd_components() -> dict[str, Any]:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # Sizes follow diffusers' own tests (tests/pipelines/stable_diffusion): small, but every block
    # type SD uses is present, including cross-attention at two resolutions.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,  # 32x32 latents = 64x64 images (the tiny VAE downsamples 2x)
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    vae = _tiny_vae()
    with tempfile.TemporaryDirectory() as d:
        write_byte_clip_tokenizer(Path(d))
        tokenizer = CLIPTokenizer.from_pretrained(d)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            projection_dim=32,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def _sd15_random_components() -> dict[str, Any]:
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # The published stable-diffusion-v1-5 configs (unet/, vae/, text_encoder/config.json).
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _sd_vae(sample_size=512)
    with tempfile.TemporaryDirectory() as d:
        write_byte_clip_tokenizer(Path(d))
        tokenizer = CLIPTokenizer.from_pretrained(d)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def _sdxl_text_encoders(tokenizer: Any, specs: list[dict[str, Any]]) -> tuple[Any, Any]:
    """SDXL's two text encoders: a CLIPTextModel and a CLIPTextModelWithProjection (the pooled one)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=77,
    )
    return CLIPTextModel(CLIPTextConfig(**ids, **specs[0])), CLIPTextModelWithProjection(
        CLIPTextConfig(**ids, **specs[1])
    )


def _sdxl_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _tiny_sdxl_components() -> dict[str, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    # Sizes follow diffusers' own SDXL tests: both text encoders, text_time conditioning,
    # linear projections and two transformer depths, as SDXL has.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,  # 32x32 latents = 64x64 images
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # time ids + text_encoder_2's pooled width
        cross_attention_dim=64,  # 32 + 32: both encoders' hidden states side by side
        norm_num_groups=32,
    )
    vae = _tiny_vae()
    with tempfile.TemporaryDirectory() as d:
        write_byte_clip_tokenizer(Path(d))
        tokenizer = CLIPTokenizer.from_pretrained(d)
        tokenizer_2 = CLIPTokenizer.from_pretrained(d)
    small = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        projection_dim=32,
        hidden_act="gelu",
    )
    te, te2 = _sdxl_text_encoders(tokenizer, [small, small])
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=_sdxl_scheduler(),
    )


def _sdxl_random_components() -> dict[str, Any]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    # The published stable-diffusion-xl-base-1.0 configs (unet/, vae/, text_encoder*/config.json).
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    )
    vae = _sd_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # SDXL's own VAE config
    with tempfile.TemporaryDirectory() as d:
        write_byte_clip_tokenizer(Path(d))
        tokenizer = CLIPTokenizer.from_pretrained(d)
        tokenizer_2 = CLIPTokenizer.from_pretrained(d)
    vit_l = dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    big_g = dict(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
    )
    te, te2 = _sdxl_text_encoders(tokenizer, [vit_l, big_g])
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=te,
        text_encoder_2=te2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=_sdxl_scheduler(),
    )


def small_blip(
    tok: Any,
    hidden: int,
    intermediate: int,
    image_size: int,
    patch_size: int,
    text_layers: int = 2,
    vision_layers: int = 2,
    max_positions: int = 64,
) -> Any:
    """A small random-weight BlipForConditionalGeneration over tokenizer `tok` (4 heads everywhere)."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    common = dict(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=4)
    text = dict(
        vocab_size=len(tok),
        encoder_hidden_size=hidden,
        num_hidden_layers=text_layers,
        max_position_embeddings=max_positions,
        **common,
        **blip_text_ids(tok),
    )
    # BLIP's vision default initializer_range is 1e-10: random weights would then ignore the image
    # and caption every crop alike. 0.02 (BERT's) makes the random captioner image-dependent.
    vision = dict(
        num_hidden_layers=vision_layers,
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=0.02,
        **common,
    )
    return BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))


def _tiny_blip() -> tuple[Any, Any]:
    with tempfile.TemporaryDirectory() as d:
        processor = build_blip_processor(Path(d), image_size=64, words=_BLIP_WORDS)
    return small_blip(
        processor.tokenizer, hidden=32, intermediate=37, image_size=64, patch_size=16
    ), processor


def _tiny_clip() -> tuple[Any, Any]:
    """A tiny random-weight CLIP (32 px images, byte-level text) with its processor: the plumbing of
    CLIP-based evaluation, offline. Its scores mean nothing; the maths around them is what is tested."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_byte_clip_tokenizer(Path(d))
        tok = CLIPTokenizer.from_pretrained(d)
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    return model, CLIPProcessor(image_processor=image_proc, tokenizer=tok)


def _blip_base_random() -> tuple[Any, Any]:
    from transformers import BlipConfig, BlipForConditionalGeneration

    # Salesforce/blip-image-captioning-base: ViT-B/16 at 384 px + BERT-base decoder (~224M).
    with tempfile.TemporaryDirectory() as d:
        processor = build_blip_processor(Path(d), image_size=384, words=_BLIP_WORDS)
    tok = processor.tokenizer
    text = dict(
        vocab_size=30524,
        **blip_text_ids(tok),
    )
    vision = dict(image_size=384, patch_size=16, initializer_range=0.02)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    return model, processor


@dataclass(frozen=True)
class Builtin:
    """A builtin: a random-weight preset built from a config, or trained weights shipped in the package."""

    name: str
    kind: str  # "text-to-image", "captioner" or "judge"
    description: str
    build: Callable[[], Any] | None = None
    folder: str = ""  # trained builtins: folder under WEIGHTS_DIR, with its SHA256SUMS
    family: str = SD  # text-to-image builtins: `sd` or `sdxl` (finestyle.core.sd)


# Trained builtins ship here, each folder in its ordinary save_pretrained layout plus SHA256SUMS.
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
SHA256SUMS = "SHA256SUMS"


def weights_dir() -> Path:
    """Where trained builtins are read from: $FINESTYLE_WEIGHTS_DIR, else the package's own weights."""
    return Path(os.environ.get("FINESTYLE_WEIGHTS_DIR") or WEIGHTS_DIR)


def builtin_folder(name: str) -> Path:
    """The verified folder of a trained builtin: every file's sha256 must match its SHA256SUMS line."""
    b = BUILTINS[name]
    folder = weights_dir() / b.folder
    sums = folder / SHA256SUMS
    if not sums.is_file():
        raise ModelLoadError(
            f"{name}: its weights are not installed ({sums} is missing); reinstall FineStyle from a "
            f"full checkout, or train them with `finestyle world train --model {b.folder.removeprefix('world-')}`"
        )
    expected = dict(reversed(line.split(None, 1)) for line in sums.read_text().splitlines() if line.strip())
    actual = hash_tree(folder, exclude=(SHA256SUMS,))
    for rel in sorted(set(expected) | set(actual)):
        if expected.get(rel) != actual.get(rel):
            what = (
                "is missing"
                if rel not in actual
                else "is not listed"
                if rel not in expected
                else "does not match its sha256"
            )
            raise ModelLoadError(
                f"{name}: {folder / rel} {what} in {sums}; the weights are corrupted or were edited, "
                "restore them from a clean checkout (`git checkout -- finestyle/weights`)"
            )
    return folder


def write_sha256sums(folder: str | os.PathLike) -> Path:
    """Record the sha256 of every file in `folder` (the format of `sha256sum`), for `builtin_folder`."""
    folder = Path(folder)
    lines = [f"{h}  {rel}" for rel, h in hash_tree(folder, exclude=(SHA256SUMS,)).items()]
    (folder / SHA256SUMS).write_text("\n".join(lines) + "\n")
    return folder / SHA256SUMS


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin(
            "builtin:tiny-sd",
            "text-to-image",
            "tiny Stable Diffusion (UNet 32/64 ch with cross-attention, VAE, CLIP text, DDIM); "
            "random weights, CPU-fast",
            _tiny_sd_components,
        ),
        Builtin(
            "builtin:sd15-random",
            "text-to-image",
            "Stable Diffusion 1.5 architecture (860M UNet, VAE, CLIP ViT-L text) with random "
            "weights, for benchmarks",
            _sd15_random_components,
        ),
        Builtin(
            "builtin:tiny-sdxl",
            "text-to-image",
            "tiny SDXL (two CLIP text encoders, text_time conditioning, UNet 32/64 ch, VAE, Euler); "
            "random weights, CPU-fast",
            _tiny_sdxl_components,
            family=SDXL,
        ),
        Builtin(
            "builtin:sdxl-random",
            "text-to-image",
            "SDXL base architecture (2.6B UNet, CLIP ViT-L + OpenCLIP bigG text, VAE) with random "
            "weights, for benchmarks and memory figures",
            _sdxl_random_components,
            family=SDXL,
        ),
        Builtin(
            "builtin:tiny-blip",
            "captioner",
            "tiny BLIP captioner (ViT 64 px + 2-layer BERT decoder) with its processor",
            _tiny_blip,
        ),
        Builtin(
            "builtin:blip-base-random",
            "captioner",
            "BLIP-base architecture (ViT-B/16 384 px + BERT-base decoder, 224M) with random "
            "weights, for benchmarks",
            _blip_base_random,
        ),
        Builtin(
            "builtin:tiny-clip",
            "clip",
            "tiny CLIP (ViT 32 px + byte-level text) with random weights: eval's CLIP judge, offline",
            _tiny_clip,
        ),
        Builtin(
            "builtin:world-sd",
            "text-to-image",
            "Stable Diffusion trained on the procedural world (64 px, 16x16 latents, word-level CLIP "
            "text); knows every style but the held-out one",
            folder="world-sd",
        ),
        Builtin(
            "builtin:world-blip",
            "captioner",
            "BLIP trained to caption world scenes with content words",
            folder="world-blip",
        ),
        Builtin(
            "builtin:world-judge",
            "judge",
            "ResNet multi-label classifier of the world: objects, backgrounds and styles",
            folder="world-judge",
        ),
    ]
}


def is_builtin(name: str) -> bool:
    return str(name).startswith(BUILTIN_PREFIX)


def _get_builtin(name: str, kind: str) -> Builtin:
    b = BUILTINS.get(name)
    if b is None:
        known = ", ".join(BUILTINS)
        raise ModelLoadError(f"unknown builtin model {name!r}; known builtins: {known}")
    if b.kind != kind:
        raise ModelLoadError(f"{name!r} is a {b.kind} model, but a {kind} model is needed here")
    return b


def pipeline_class(family: str) -> Any:
    """The diffusers pipeline class of a family."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == SDXL else StableDiffusionPipeline


def _pipeline_extras(family: str) -> dict[str, Any]:
    """Constructor arguments beyond the components: no safety checker (sd), no watermarker (sdxl)."""
    if family == SDXL:
        return dict(add_watermarker=False)
    return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_builtin_pipeline(name: str) -> Any:
    """Build a builtin text-to-image preset as its family's pipeline (fp32, CPU, seeded)."""
    b = _get_builtin(name, "text-to-image")
    cls = pipeline_class(b.family)
    if b.folder:
        return cls.from_pretrained(builtin_folder(name), use_safetensors=True, **_pipeline_extras(b.family))
    with _seeded(0):
        comps = b.build()
    return cls(**comps, **_pipeline_extras(b.family))


def model_family(name: str) -> str:
    """`sd` or `sdxl` for a model argument, read from the model itself (builtin, folder, file or hub id)."""
    name = str(name)
    if is_builtin(name):
        return _get_builtin(name, "text-to-image").family
    p = Path(name).expanduser()
    if p.is_file():
        return _single_file_family(p)
    if p.is_dir():
        fam = folder_family(p)
        if fam is None:
            raise ModelLoadError(
                f"cannot load model {name!r}: the local folder lacks the files a model needs (no "
                "model_index.json or unet/config.json); pass a diffusers folder saved with save_pretrained, "
                "a single-file .safetensors checkpoint, or a builtin (`finestyle models`)"
            )
        return fam
    from diffusers import DiffusionPipeline

    index = _guarded_load(name, lambda: DiffusionPipeline.load_config(name))
    return family_of_class(index.get("_class_name", ""))


def _single_file_family(path: Path) -> str:
    """The family of a single-file checkpoint, from its tensor names (SDXL has a second text encoder)."""
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"cannot load model {str(path)!r}: single-file checkpoints are read as .safetensors only "
            "(pickled .ckpt/.bin files can run code); convert it, or pass a diffusers folder"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise ModelLoadError(f"cannot read {str(path)!r} as safetensors: {exc}") from exc
    if any(k.startswith(("conditioner.embedders.1.", "text_encoder_2.")) for k in keys):
        return SDXL
    return SD


def load_clip(name: str, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) from a hub id (e.g. openai/clip-vit-large-patch14), a local folder or
    `builtin:tiny-clip`; safetensors only."""
    from transformers import CLIPModel, CLIPProcessor

    dev = device if isinstance(device, torch.device) else pick_device(device)
    if is_builtin(name):
        _get_builtin(name, "clip")
        with _seeded(0):
            model, proc = _tiny_clip()
    else:
        model = _guarded_load(name, lambda: CLIPModel.from_pretrained(name, use_safetensors=True))
        proc = _guarded_load(name, lambda: CLIPProcessor.from_pretrained(name))
    return model.to(dev).eval(), proc


def build_builtin_captioner(name: str) -> tuple[Any, Any]:
    """Build a builtin captioner preset: (BlipForConditionalGeneration, BlipProcessor)."""
    b = _get_builtin(name, "captioner")
    if b.folder:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        folder = builtin_folder(name)
        model = BlipForConditionalGeneration.from_pretrained(folder, use_safetensors=True)
        return model.eval(), BlipProcessor.from_pretrained(folder)
    with _seeded(0):
        model, processor = b.build()
    return model.eval(), processor


def save_builtin(name: str, out: str | os.PathLike) -> Path:
    """Write a builtin as an ordinary local folder (safetensors) that `from_pretrained` loads."""

    b = BUILTINS.get(name)
    if b is None:
        raise UserError(f"unknown builtin model {name!r}; known builtins: {', '.join(BUILTINS)}")
    out = Path(out)
    with staging_dir(out) as tmp:
        if b.folder:
            shutil.copytree(builtin_folder(name), tmp, dirs_exist_ok=True)
        elif b.kind == "text-to-image":
            build_builtin_pipeline(name).save_pretrained(tmp, safe_serialization=True)
        else:
            model, processor = load_clip(name, "cpu") if b.kind == "clip" else build_builtin_captioner(name)
            model.save_pretrained(tmp, safe_serialization=True)
            processor.save_pretrained(tmp)
    return out


# --------------------------------------------------------------------------------------------
# loading


def _explain_load_failure(name: str, exc: BaseException) -> ModelLoadError:
    text = f"{type(exc).__name__}: {exc}"
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            why = "is a file, not a model folder"
        else:
            why = f"lacks the files a model needs ({str(exc).splitlines()[0][:200]})"
        return ModelLoadError(
            f"cannot load model {name!r}: the local folder {why}; pass a diffusers/transformers "
            "folder saved with save_pretrained (safetensors), or a builtin (`finestyle models`)"
        )
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        return ModelLoadError(
            f"cannot load model {name!r}: no such local folder; pass an existing diffusers/transformers "
            "folder, a hub id (org/name) or a builtin (`finestyle models`)"
        )
    if "/" in name or "offline" in text.lower() or "connect" in text.lower():
        return ModelLoadError(
            f"cannot load model {name!r}: the Hugging Face hub is unreachable (or offline mode is on) "
            "and it is not in the local cache, or it has no safetensors weights; on a connected machine "
            f"run `huggingface-cli download {name} --local-dir DIR` and pass DIR instead"
        )
    return ModelLoadError(
        f"cannot load model {name!r}: it is neither a builtin (`finestyle models`), an existing "
        "local folder, nor a Hugging Face hub id of the form org/name"
    )


_HUB_PROBED: list[bool] = []


def _looks_like_hub_id(name: str) -> bool:
    return (
        not name.startswith(("builtin:", "/", ".", "~"))
        and name.count("/") == 1
        and not Path(name).expanduser().exists()
    )


def offline_unless_hub_reachable(timeout: float = 3.0) -> bool:
    """With HF_HUB_OFFLINE unset, probe the hub once per process (a TCP connect to its endpoint within
    `timeout` s). When it is unreachable, switch this process to offline mode, so that a cached model
    loads and any other fails at once rather than after the hub client's retries. True when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    if _HUB_PROBED:
        return _HUB_PROBED[0]
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        _HUB_PROBED.append(False)
        return False
    except OSError:
        pass
    _HUB_PROBED.append(True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    from huggingface_hub.utils import reset_sessions

    reset_sessions()  # new sessions refuse requests at once (offline adapters)
    try:
        import transformers.utils.hub as tf_hub

        tf_hub._is_offline_mode = True
    except (ImportError, AttributeError):
        pass
    return True


def _guarded_load(name: str, load: Callable[[], Any]) -> Any:
    """Run a `from_pretrained` call; turn hub/folder failures into one clear ModelLoadError. A hub id
    with the hub unreachable is tried offline (`offline_unless_hub_reachable`)."""
    if _looks_like_hub_id(name):
        offline_unless_hub_reachable()
    try:
        with quiet_hf_logs():
            return load()
    except (OSError, ValueError) as exc:
        raise _explain_load_failure(name, exc) from exc
    except Exception as exc:  # hub client errors that aren't OSError
        if type(exc).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            raise _explain_load_failure(name, exc) from exc
        raise


SINGLE_FILE_CONFIG_ENV = "FINESTYLE_SINGLE_FILE_CONFIG"
"""A diffusers folder or hub id whose configs and tokenizers fit a single-file checkpoint; unset,
diffusers picks the published base of the checkpoint's family (which must then be in the HF cache
on a machine without network)."""


def _load_single_file(cls: Any, path: Path, dtype: torch.dtype, extras: dict[str, Any]) -> Any:
    """A single-file (original-layout) checkpoint through diffusers' `from_single_file`."""
    config = os.environ.get(SINGLE_FILE_CONFIG_ENV)
    kw = {"config": config} if config else {}
    try:
        with quiet_hf_logs():
            return cls.from_single_file(str(path), torch_dtype=dtype, **kw, **extras)
    except Exception as exc:  # diffusers/hub errors of every kind: one line that says what to do
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(
            f"cannot load the single-file checkpoint {str(path)!r} ({first}); diffusers reads it with the "
            f"configs and tokenizers of its base model: set {SINGLE_FILE_CONFIG_ENV} to a diffusers "
            "folder (or a cached hub id) of the same architecture, or convert it to a diffusers folder"
        ) from exc


def load_sd_pipeline(
    name: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> Any:
    """Load a Stable Diffusion (1.x/2.x or XL) pipeline from a hub id, local folder, single file or builtin.

    The family comes from the model itself (`model_family`): an SDXL base loads as
    `StableDiffusionXLPipeline`, anything else as `StableDiffusionPipeline`.

    Args:
        name: `org/name` on the hub, a local diffusers folder, a single-file `.safetensors`
            checkpoint, or `builtin:tiny-sd` etc.
        device: where to put it; default: cuda > mps > cpu.
        dtype: torch dtype or a name (fp32/fp16/bf16); default: fp32 on CPU, fp16 on GPU.
    """
    quiet_progress_bars()
    dev = device if isinstance(device, torch.device) else pick_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dev, dtype)
    name = str(name)
    if is_builtin(name):
        pipe = build_builtin_pipeline(name)
    else:
        family = model_family(name)
        cls, extras = pipeline_class(family), _pipeline_extras(family)
        if Path(name).expanduser().is_file():
            pipe = _load_single_file(cls, Path(name).expanduser(), dt, extras)
        else:
            pipe = _guarded_load(
                name, lambda: cls.from_pretrained(name, use_safetensors=True, torch_dtype=dt, **extras)
            )
    pipe.set_progress_bar_config(disable=True)
    if pipe.unet.dtype != dt:
        pipe.to(dtype=dt)
    return pipe.to(dev)


def load_captioner(
    name: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[Any, Any]:
    """Load a BLIP captioner and its processor from a hub id, local folder or builtin name."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    dev = device if isinstance(device, torch.device) else pick_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else pick_dtype(dev, dtype)
    name = str(name)
    if is_builtin(name):
        model, processor = build_builtin_captioner(name)
    else:
        processor = _guarded_load(name, lambda: BlipProcessor.from_pretrained(name))
        model = _guarded_load(
            name, lambda: BlipForConditionalGeneration.from_pretrained(name, use_safetensors=True)
        )
    if model.dtype != dt:
        model = model.to(dtype=dt)
    return model.to(dev).eval(), processor


def load_judge(name: str, device: str | torch.device | None = None) -> Any:
    """Load an image classifier (e.g. `builtin:world-judge`, or a folder saved with save_pretrained)."""
    from transformers import AutoModelForImageClassification

    dev = device if isinstance(device, torch.device) else pick_device(device)
    name = str(name)
    if is_builtin(name):
        folder: str | Path = builtin_folder(_get_builtin(name, "judge").name)
    else:
        folder = name
    model = _guarded_load(
        name, lambda: AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True)
    )
    return model.to(dev).eval()


def model_fingerprint(name: str | None) -> str | None:
    """Identify a model for cache keys: builtin/hub name, or a hash of a local folder's files."""
    if not name:
        return None
    p = Path(name)
    if is_builtin(name) and name in BUILTINS and BUILTINS[name].folder:
        sums = weights_dir() / BUILTINS[name].folder / SHA256SUMS
        return hash_json({"name": name, "sums": sums.read_text() if sums.is_file() else ""})
    if is_builtin(name) or not p.exists():
        return name
    if p.is_file():  # a single-file checkpoint (and the configs it is read with)
        st = p.stat()
        ident = sha256_file(p) if st.st_size < 50_000_000 else f"{st.st_size}:{st.st_mtime_ns}"
        return hash_json({"file": ident, "config": os.environ.get(SINGLE_FILE_CONFIG_ENV)})
    files = (
        hash_tree(p)
        if sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) < 50_000_000
        else {
            f.relative_to(p).as_posix(): f"{f.stat().st_size}:{f.stat().st_mtime_ns}"
            for f in p.rglob("*")
            if f.is_file()
        }
    )
    return hash_json(files)
