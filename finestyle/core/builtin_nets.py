"""The builtin models' architectures: tiny and full-size random-weight SD, SDXL, BLIP and CLIP,
built offline from configs (seeded, so every machine builds the same weights).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# Words the tiny BLIP's BERT vocabulary knows. A random-weight captioner then "says" plausible
# visual phrases, which keeps the downstream concept code exercised by real strings.
_BLIP_WORDS = (
    "a an the of with and on in at near under over by its two three painting photograph picture drawing "
    "red blue green yellow orange purple white black brown pink golden small large big tall round "
    "boat lake tree trees house sun moon sky cloud clouds mountain mountains hill river flower flowers "
    "cat dog bird fish car road bridge field grass leaves forest sea beach rock rocks window door "
    "person woman man child girl boy table chair cup vase fruit apple bowl background texture pattern"
).split()


TINY_WORDS = _BLIP_WORDS
"""The tiny builtins' word list (the tiny T5 tokenizer of `core.mmdit` gives each a piece)."""


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch inside a forked RNG so building a builtin never disturbs the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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


def tiny_sd_components() -> dict[str, Any]:
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


def sd15_random_components() -> dict[str, Any]:
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


def tiny_sdxl_components() -> dict[str, Any]:
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


def sdxl_random_components() -> dict[str, Any]:
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


def tiny_blip() -> tuple[Any, Any]:
    with tempfile.TemporaryDirectory() as d:
        processor = build_blip_processor(Path(d), image_size=64, words=_BLIP_WORDS)
    return small_blip(
        processor.tokenizer, hidden=32, intermediate=37, image_size=64, patch_size=16
    ), processor


def tiny_clip() -> tuple[Any, Any]:
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


def blip_base_random() -> tuple[Any, Any]:
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
