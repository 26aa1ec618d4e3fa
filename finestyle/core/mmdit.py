"""SD 3.5 and FLUX.1: MMDiT transformers, their tiny builtins and where FineStyle's adapter goes in them.

In an MMDiT's joint attention the text tokens have their own key and value projections
(`attn.add_k_proj`, `attn.add_v_proj` in diffusers' joint blocks): the image's queries read the
prompt through them, which is the part cross-attention's K/V play in a UNet. FineStyle's adapter goes
there. FLUX's single-stream blocks project text and image tokens with one shared `to_k`/`to_v`, so an
adapter there would change the image tokens too; FineStyle leaves them alone.

The tiny builtins follow diffusers' own pipeline tests (one joint block, 4-channel 64 px latents with
a one-level VAE), with random weights, and build offline: their CLIP tokenizers are byte-level, and
their T5 tokenizer is a real `T5TokenizerFast` (SentencePiece-style Unigram, `▁` word starts) over the
tiny models' word list plus single characters.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

SD3, FLUX = "sd3", "flux"
MMDIT_FAMILIES = (SD3, FLUX)

T5_WINDOW = 256
"""Tokens the tiny builtins' T5 reads (SD 3.5 reads 256 by default, FLUX.1-dev 512, schnell 256)."""


def t5_tokenizer(words: list[str], max_length: int = T5_WINDOW) -> Any:
    """A real T5TokenizerFast over `words` (one piece each, `▁`-prefixed) and printable characters."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        additional_special_tokens=[],
        model_max_length=max_length,
    )


def tiny_t5(tokenizer: Any, d_model: int = 32) -> Any:
    """A two-layer T5 encoder (diffusers' tests use one of this size)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _clip_pair(projection: bool) -> tuple[Any, Any, Any, Any]:
    """Two tiny byte-level CLIP text encoders and their tokenizers (CLIP-L and CLIP-G's places)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from finestyle.core.builtin_nets import write_byte_clip_tokenizer

    with tempfile.TemporaryDirectory() as d:
        write_byte_clip_tokenizer(Path(d))
        tok, tok2 = CLIPTokenizer.from_pretrained(d), CLIPTokenizer.from_pretrained(d)
    cfg = CLIPTextConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tok),
        projection_dim=32,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg), cls(cfg), tok, tok2


def _tiny_vae(latent_channels: int) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def tiny_sd3_components() -> dict[str, Any]:
    """SD 3.5's layout at toy size: CLIP-L, CLIP-G and T5 text, one joint block, flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from finestyle.core.builtin_nets import TINY_WORDS

    te, te2, tok, tok2 = _clip_pair(projection=True)
    tok3 = t5_tokenizer(TINY_WORDS)
    transformer = SD3Transformer2DModel(
        sample_size=32,  # 32x32 latents = 64x64 images (the VAE halves)
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # T5's width; CLIP-L + CLIP-G (32 + 32) fill it too
        pooled_projection_dim=64,  # both CLIPs' pooled projections
        out_channels=4,
    )
    return dict(
        transformer=transformer,
        vae=_tiny_vae(4),
        text_encoder=te,
        text_encoder_2=te2,
        text_encoder_3=tiny_t5(tok3, d_model=64),
        tokenizer=tok,
        tokenizer_2=tok2,
        tokenizer_3=tok3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def tiny_flux_components() -> dict[str, Any]:
    """FLUX.1's layout at toy size: CLIP-L pooled + T5 text, one double- and one single-stream block."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from finestyle.core.builtin_nets import TINY_WORDS

    te, _, tok, _ = _clip_pair(projection=False)
    tok2 = t5_tokenizer(TINY_WORDS)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2, as FLUX packs them
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    return dict(
        transformer=transformer,
        vae=_tiny_vae(4),
        text_encoder=te,
        text_encoder_2=tiny_t5(tok2, d_model=32),
        tokenizer=tok,
        tokenizer_2=tok2,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
    )


# ------------------------------------------------------------------------------------------------
# conditioning and flow matching, for training (the pipelines do the same at inference)


def _family(pipe: Any) -> str:
    """SD3 or FLUX for an MMDiT pipeline, by its class (as `core.sd.pipe_family` says; sd imports this
    module, so it is not imported back)."""
    return SD3 if "StableDiffusion3" in type(pipe).__name__ else FLUX


def t5_length(pipe: Any) -> int:
    """Tokens of T5 text the pipeline encodes: its T5 tokenizer's window, at most 512."""
    tok = getattr(pipe, "tokenizer_3" if _family(pipe) == SD3 else "tokenizer_2", None)
    n = getattr(tok, "model_max_length", None) or 256  # SD 3 without T5: the pipeline's default
    return int(min(n, 512))


def encode_mmdit(pipe: Any, texts: list[str], device: Any) -> tuple[Any, Any]:
    """(prompt embeddings [n, seq, dim], pooled [n, pdim]) exactly as the pipeline's `encode_prompt`."""
    if _family(pipe) == SD3:
        emb, _, pooled, _ = pipe.encode_prompt(
            prompt=texts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=t5_length(pipe),
        )
        return emb, pooled
    emb, pooled, _ = pipe.encode_prompt(
        prompt=texts, prompt_2=None, device=device, max_sequence_length=t5_length(pipe)
    )
    return emb, pooled


def bucket_step(pipe: Any) -> int:
    """Image sizes a step of which the transformer can patch: the VAE factor times 2 (SD 3's 2x2
    patches, FLUX's 2x2 latent packing)."""
    return int(pipe.vae_scale_factor) * 2


def flow_inputs(latents: Any, noise: Any, sigmas: Any) -> tuple[Any, Any]:
    """Rectified flow: x_sigma = (1 - sigma) x + sigma noise, and the velocity target noise - x."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - s) * latents + s * noise, noise - latents


def mmdit_forward(
    net: Any, family: str, noisy: Any, sigmas: Any, hidden: Any, pooled: Any, guidance: float | None
) -> Any:
    """The transformer's velocity for noisy latents [n, c, h, w] at `sigmas`, in the latents' layout.
    `guidance`: FLUX.1-dev's distilled guidance input (None for models without one)."""
    import torch

    if family == SD3:
        return net(
            noisy, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=sigmas * 1000
        ).sample
    from diffusers import FluxPipeline

    n, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
    txt_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    g = torch.full((n,), guidance, device=noisy.device) if guidance is not None else None
    out = net(
        packed,
        encoder_hidden_states=hidden,
        pooled_projections=pooled,
        timestep=sigmas,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=g,
    ).sample
    # unpack [n, (h/2)(w/2), c*4] -> [n, c, h, w]
    return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


# ------------------------------------------------------------------------------------------------
# joint attention: where each text token is read, for prepare's concept boxes


class CaptureJointAttention:
    """Wraps a joint block's attention processor: the block computes as before, and the image
    queries' softmax over the joint keys (image and text tokens, as the block attends) is summed over
    heads and its text columns kept in `store[name]`: [batch, image tokens, text tokens].

    SD 3 concatenates [image, text] tokens; FLUX [text, image], with rotary embeddings on both."""

    def __init__(self, name: str, inner: Any, family: str, store: dict[str, Any]) -> None:
        self.name, self.inner, self.family, self.store = name, inner, family, store

    def __call__(
        self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        if encoder_hidden_states is not None:
            self.store[self.name] = self._probs(
                attn, hidden_states, encoder_hidden_states, kwargs.get("image_rotary_emb")
            )
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    def _probs(self, attn: Any, img: Any, txt: Any, rotary: Any) -> Any:
        import torch

        def heads(x: Any) -> Any:  # [b, seq, heads, d]
            return x.unflatten(-1, (attn.heads, -1))

        q, k = heads(attn.to_q(img)), heads(attn.to_k(img))
        eq, ek = heads(attn.add_q_proj(txt)), heads(attn.add_k_proj(txt))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if getattr(attn, "norm_added_q", None) is not None:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        n_txt = txt.shape[1]
        if self.family == SD3:
            q_all, k_all = torch.cat([q, eq], 1), torch.cat([k, ek], 1)
            img_rows, txt_cols = slice(0, img.shape[1]), slice(img.shape[1], None)
        else:
            q_all, k_all = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
            if rotary is not None:
                from diffusers.models.embeddings import apply_rotary_emb

                q_all = apply_rotary_emb(q_all, rotary, sequence_dim=1)
                k_all = apply_rotary_emb(k_all, rotary, sequence_dim=1)
            img_rows, txt_cols = slice(n_txt, None), slice(0, n_txt)
        scale = q_all.shape[-1] ** -0.5
        logits = torch.einsum("bqhd,bkhd->bhqk", q_all[:, img_rows].float(), k_all.float()) * scale
        return logits.softmax(-1)[..., txt_cols].sum(1).cpu()


def t5_token_spans(tokenizer: Any, prompt: str, phrases: list[str], offset: int) -> dict[str, list[int]]:
    """Positions of each phrase's T5 tokens in the joint text sequence (T5's tokens start at `offset`)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    spans: dict[str, list[int]] = {}
    for ph in phrases:
        sub = tokenizer(ph, add_special_tokens=False).input_ids
        for i in range(len(ids) - len(sub) + 1) if sub else ():
            if ids[i : i + len(sub)] == sub:
                spans[ph] = [offset + j for j in range(i, i + len(sub))]
                break
    return spans


def joint_attention_maps(
    pipe: Any, latents: Any, prompt: str, phrases: list[str], sigma: float, seed: int
) -> dict[str, Any]:
    """Per phrase, its image-token attention averaged over the joint blocks, on the patch grid
    [h/2, w/2] of `latents` (scaled VAE latents), at noise level `sigma`."""
    import torch

    family = _family(pipe)
    net = pipe.transformer
    t5 = pipe.tokenizer_3 if family == SD3 else pipe.tokenizer_2
    # SD 3's joint text is [CLIP tokens (its window), T5 tokens]; FLUX's is T5 alone
    offset = int(pipe.tokenizer.model_max_length) if family == SD3 else 0
    spans = t5_token_spans(t5, prompt, phrases, offset)
    if not spans:
        return {}
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g).to(latents.dtype)
    noisy, _ = flow_inputs(latents, noise, torch.tensor([sigma], dtype=latents.dtype))
    hidden, pooled = encode_mmdit(pipe, [prompt], latents.device)
    store: dict[str, Any] = {}
    original = dict(net.attn_processors)
    procs = {
        n: CaptureJointAttention(n, p, family, store) if n.startswith("transformer_blocks.") else p
        for n, p in original.items()
    }
    guidance = 3.5 if net.config.get("guidance_embeds") else None
    try:
        net.set_attn_processor(procs)
        with torch.no_grad():
            mmdit_forward(
                net,
                family,
                noisy.to(net.dtype),
                torch.tensor([sigma]),
                hidden.to(net.dtype),
                pooled.to(net.dtype),
                guidance,
            )
    finally:
        net.set_attn_processor(original)
    gh, gw = latents.shape[-2] // 2, latents.shape[-1] // 2
    out = {}
    for ph, idx in spans.items():
        maps = [p[0, :, idx].sum(-1).reshape(gh, gw) for p in store.values() if p.shape[1] == gh * gw]
        if maps:
            out[ph] = torch.stack(maps).mean(0)
    return out


# ------------------------------------------------------------------------------------------------
# fixed inputs for merge and parity checks


def probe_inputs(net: Any, family: str, batch: int, sigma: float, seed: int = 0) -> dict[str, Any]:
    """Fixed transformer inputs as the pipelines build them (8x8 latents, 7 text tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed + batch)
    cfg = net.config
    text = torch.randn(batch, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    if family == SD3:
        x = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
        return dict(
            hidden_states=x,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=torch.full((batch,), sigma * 1000),
        )
    x = torch.randn(batch, 16, cfg.in_channels, generator=g)  # 4x4 packed patches
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    out = dict(
        hidden_states=x,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=torch.full((batch,), sigma),
        img_ids=img_ids,
        txt_ids=torch.zeros(7, 3),
    )
    if cfg.guidance_embeds:
        out["guidance"] = torch.full((batch,), 3.5)
    return out


CASES = ((1, 0.3), (2, 0.8))


def velocities(net: Any, family: str) -> dict[str, Any]:
    """The transformer's velocities on the fixed inputs (merge and parity checks)."""
    import torch

    with torch.no_grad():
        return {f"b{b}_s{s}": net(**probe_inputs(net, family, b, s)).sample.float() for b, s in CASES}
