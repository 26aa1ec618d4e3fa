"""The world's model architectures: standard diffusers/transformers classes, sized for a CPU.

Each builder returns an untrained model; `finestyle.world.train` trains them and saves them with
`save_pretrained` (safetensors), so the project's ordinary loading code reads them as real weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finestyle.core.models import build_blip_processor, small_blip

from .data import JUDGE_LABELS
from .scene import world_words

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<unk>"
TEXT_MAX_TOKENS = 32


def vae_model() -> Any:
    """The world's AutoencoderKL: 64 px RGB <-> 4×16×16 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )


def judge_model() -> Any:
    """The world's judge: a small multi-label ResNet over objects, backgrounds and styles."""
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(
        num_channels=3,
        embedding_size=32,
        hidden_sizes=[32, 64, 128, 192],
        depths=[1, 1, 2, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=len(JUDGE_LABELS),
        id2label=dict(enumerate(JUDGE_LABELS)),
        label2id={n: i for i, n in enumerate(JUDGE_LABELS)},
        problem_type="multi_label_classification",
    )
    return ResNetForImageClassification(cfg)


def world_tokenizer() -> Any:
    """A word-level tokenizer over the world's words: one token per word, unknown words -> `<unk>`.

    It pads with the end token and wraps every text in start/end tokens, as CLIP's tokenizer does.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([BOS, EOS, UNK, "."] + world_words())}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        model_max_length=TEXT_MAX_TOKENS,
    )


def text_encoder_model(tokenizer: Any) -> Any:
    """A small CLIPTextModel over the world tokenizer's vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_MAX_TOKENS,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def unet_model() -> Any:
    """The world's UNet2DConditionModel on 4×16×16 latents, designed for a 2-core CPU.

    Two levels: 16×16 with 32 channels and no attention, then 8×8 with 64 channels where the down and
    up blocks have self- and cross-attention with one 64-wide head; no mid block (it cost a fifth of
    the step and the 8×8 level's own attention does its work). Profiled forward and
    backward at batch 32 on a 2-core AMD EPYC (AVX2, fp32): the earlier design (48/96/128 channels,
    4 heads of 12 dims, attention at 16×16) spent most of its step in CPU flash-attention's backward
    on narrow heads over 256 tokens, and its 4×4 mid block cost a third of the rest; this one takes
    about a quarter of its time (`docs/findings/world.md`, "A world-sd built for this CPU").
    Cross-attention at 8×8 still gives prepare's attention boxes one map per 8 px of a 64 px image.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type=None,  # the 8x8 level's own attention blocks do the mid block's work
        cross_attention_dim=64,
        attention_head_dim=1,  # diffusers reads this as the number of heads: one head, 64 wide
        norm_num_groups=16,
    )


def scheduler() -> Any:
    """SD's own DDIM settings."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def blip_processor(folder: Path) -> Any:
    """BLIP's processor for 64 px images, with a BERT word-piece tokenizer over the world's words.

    Pixels go to [-1, 1], as every world model is trained (not CLIP's mean/std).
    """
    words = [w for w in world_words() if w not in ("in", "style")] + ["in", "picture", "of"]
    return build_blip_processor(folder, 64, words, max_length=40, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def blip_model(processor: Any) -> Any:
    """A small BlipForConditionalGeneration: ViT on 8 px patches of 64 px images, 2-layer decoder."""
    return small_blip(
        processor.tokenizer,
        hidden=96,
        intermediate=192,
        image_size=64,
        patch_size=8,
        vision_layers=3,
        max_positions=40,
    )
