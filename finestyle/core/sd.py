"""What differs between the Stable Diffusion families, in one place.

FineStyle supports two families, told apart from the model itself, never from a flag:

- `sd`: SD 1.x/2.x. One CLIP text encoder; the UNet takes `encoder_hidden_states` only.
- `sdxl`: SDXL and its fine-tunes. Two text encoders whose penultimate hidden states are
  concatenated; the UNet also takes the second encoder's pooled embedding (`text_embeds`) and the
  micro-conditioning `time_ids` = (original h, w, crop top, left, target h, w)
  (`addition_embed_type="text_time"`).

The denoising loop, the samplers and the batcher pass one conditioning tensor per image row. For
SDXL that tensor is the hidden states with the pooled embedding packed into extra rows at the end
(`pack_cond`); the UNet callers unpack it (`unet_kwargs`). The packing never leaves the process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from finestyle.core.errors import UserError

SD, SDXL, SD3, FLUX = "sd", "sdxl", "sd3", "flux"
FAMILIES = (SD, SDXL, SD3, FLUX)
MMDIT = (SD3, FLUX)
"""The transformer (MMDiT) families: SD 3.x and FLUX.1 (`finestyle.core.mmdit`)."""


def unet_family(unet_config: Any) -> str:
    """`sdxl` when the UNet takes SDXL's added text/time conditioning, else `sd`."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    return SDXL if get("addition_embed_type", None) == "text_time" else SD


def pipe_family(pipe: Any) -> str:
    """The family of a loaded diffusers pipeline."""
    if getattr(pipe, "transformer", None) is not None:
        return family_of_class(type(pipe).__name__)
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXL
    return unet_family(pipe.unet.config)


def family_of_class(class_name: str) -> str:
    """The family named by a pipeline or transformer class (`_class_name` in model_index.json)."""
    if "StableDiffusion3" in class_name or "SD3" in class_name:
        return SD3
    if "Flux" in class_name:
        return FLUX
    return SDXL if "StableDiffusionXL" in class_name else SD


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoising network: its UNet, or its MMDiT transformer (SD 3.x, FLUX.1)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def folder_family(folder: str | Path) -> str | None:
    """The family of a saved diffusers folder (model_index.json, else unet/config.json); None if neither."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file():
        return family_of_class(json.loads(index.read_text()).get("_class_name", ""))
    unet_cfg = folder / "unet" / "config.json"
    if unet_cfg.is_file():
        return unet_family(json.loads(unet_cfg.read_text()))
    transformer_cfg = folder / "transformer" / "config.json"
    if transformer_cfg.is_file():
        return family_of_class(json.loads(transformer_cfg.read_text()).get("_class_name", ""))
    return None


def native_size(pipe: Any) -> int:
    """The image size the base model was trained at: UNet `sample_size` x the VAE factor (512, 1024);
    for SD 3.x and FLUX.1, their pipeline's default size (1024)."""
    if getattr(pipe, "unet", None) is None:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


# ------------------------------------------------------------------------------------------------
# text conditioning


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


def text_encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs in the order the family concatenates them."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    for k in ("_2", "_3"):  # SDXL's second CLIP; SD 3's CLIP-G and T5; FLUX's T5
        if getattr(pipe, "text_encoder" + k, None) is not None:
            pairs.append((getattr(pipe, "tokenizer" + k), getattr(pipe, "text_encoder" + k)))
    return [(t, e) for t, e in pairs if e is not None]


@torch.no_grad()
def encode_texts(pipe: Any, texts: list[str], device: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [n, seq, dim], pooled [n, pdim] or None) as the family's own pipeline computes them.

    sd: the last hidden state of the one encoder. sdxl: both encoders' penultimate hidden states,
    concatenated, and the last encoder's projected pooled output (diffusers' `encode_prompt`).
    """
    family = pipe_family(pipe)
    if family == SD:
        enc = pipe.text_encoder
        return enc(tokenize(pipe.tokenizer, texts).to(device or enc.device))[0], None
    if family in MMDIT:
        from finestyle.core.mmdit import encode_mmdit

        return encode_mmdit(pipe, texts, device or pipe.text_encoder.device)
    hidden, pooled = [], None
    for tok, enc in text_encoders(pipe):
        out = enc(tokenize(tok, texts).to(device or enc.device), output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def pooled_rows(pooled_dim: int, hidden_dim: int) -> int:
    return math.ceil(pooled_dim / hidden_dim)


def pack_cond(hidden: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
    """One tensor per row: the hidden states, then the pooled embedding zero-padded into whole rows."""
    if pooled is None:
        return hidden
    n, dim = hidden.shape[0], hidden.shape[-1]
    rows = pooled_rows(pooled.shape[-1], dim)
    pad = torch.zeros(n, rows * dim, dtype=hidden.dtype, device=hidden.device)
    pad[:, : pooled.shape[-1]] = pooled.to(hidden.dtype)
    return torch.cat([hidden, pad.view(n, rows, dim)], dim=1)


def unpack_cond(cond: torch.Tensor, pooled_dim: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of `pack_cond`."""
    if not pooled_dim:
        return cond, None
    rows = pooled_rows(pooled_dim, cond.shape[-1])
    return cond[:, :-rows], cond[:, -rows:].reshape(cond.shape[0], -1)[:, :pooled_dim]


def pooled_dim(unet_config: Any) -> int | None:
    """The pooled text width an SDXL UNet expects (projection input minus 6 time embeddings); None for sd."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    if unet_family(unet_config) != SDXL:
        return None
    return int(get("projection_class_embeddings_input_dim")) - 6 * int(get("addition_time_embed_dim"))


def time_ids(
    original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning for one image: (orig h, orig w, crop top, crop left, target h, target w)."""
    return torch.tensor([*original, *crop_top_left, *target], dtype=torch.float32)


def unet_kwargs(
    unet_config: Any, cond: torch.Tensor, size_hw: tuple[int, int], ids: torch.Tensor | None = None
) -> dict[str, Any]:
    """The UNet's conditioning arguments for packed `cond` at image size `size_hw` (h, w).

    `ids`: per-row time ids [n, 6] (training, where each row has its own crop); default: the whole
    image at `size_hw`, uncropped, which is how SDXL pipelines generate.
    """
    pdim = pooled_dim(unet_config)
    hidden, pooled = unpack_cond(cond, pdim)
    if pooled is None:
        return {"encoder_hidden_states": hidden}
    if ids is None:
        ids = time_ids(size_hw, (0, 0), size_hw).repeat(cond.shape[0], 1)
    return {
        "encoder_hidden_states": hidden,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.to(cond.device, cond.dtype)},
    }


# ------------------------------------------------------------------------------------------------
# SDXL's original (SGM) module names, for kohya-format files


def sgm_module_name(name: str, layers_per_block: int = 2) -> str:
    """diffusers' SDXL UNet module path -> the original SGM path kohya's SDXL LoRAs use.

    `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k` ->
    `input_blocks.4.1.transformer_blocks.0.attn2.to_k`. Each down level holds `layers_per_block`
    (resnet, attention) pairs after one downsampler; each up level `layers_per_block + 1`. The
    inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers`. Names outside the attention blocks
    are returned unchanged (FineStyle's adapters live inside them).
    """
    parts = name.split(".")
    per_up = layers_per_block + 1
    if parts[0] == "down_blocks" and len(parts) > 3 and parts[2] == "attentions":
        i, j = int(parts[1]), int(parts[3])
        return ".".join(["input_blocks", str(per_up * i + j + 1), "1", *parts[4:]])
    if parts[0] == "up_blocks" and len(parts) > 3 and parts[2] == "attentions":
        i, j = int(parts[1]), int(parts[3])
        return ".".join(["output_blocks", str(per_up * i + j), "1", *parts[4:]])
    if parts[0] == "mid_block" and len(parts) > 2 and parts[1] == "attentions":
        return ".".join(["middle_block", "1", *parts[3:]])
    return name


def onnx_cond_feeds(unet_config: Any, cond: torch.Tensor, size_hw: tuple[int, int]) -> dict[str, Any]:
    """The UNet's conditioning inputs by optimum's ONNX names, as fp32 numpy arrays: the same
    arguments as `unet_kwargs` (`encoder_hidden_states`, and for SDXL `text_embeds`, `time_ids`)."""
    kw = unet_kwargs(unet_config, cond.float(), size_hw)
    feeds = {"encoder_hidden_states": kw["encoder_hidden_states"]} | kw.get("added_cond_kwargs", {})
    return {k: v.detach().cpu().float().numpy() for k, v in feeds.items()}


def unet_input_shapes(
    unet_config: dict[str, Any], vae_scale: int, size: int, batch: int
) -> dict[str, tuple[int, ...]]:
    """The UNet's ONNX input shapes for `batch` rows of `size`-pixel square images (engine profiles)."""
    lat = size // vae_scale
    shapes: dict[str, tuple[int, ...]] = {
        "sample": (batch, int(unet_config.get("in_channels", 4)), lat, lat),
        "encoder_hidden_states": (batch, 77, int(unet_config.get("cross_attention_dim", 768))),
    }
    pdim = pooled_dim(unet_config)
    if pdim:
        shapes["text_embeds"] = (batch, pdim)
        shapes["time_ids"] = (batch, 6)
    return shapes


def penultimate_output(names: list[str]) -> str:
    """The penultimate `hidden_states.N` output of an exported text encoder (SDXL conditions on it)."""
    hs = sorted((n for n in names if n.startswith("hidden_states.")), key=lambda n: int(n.rsplit(".", 1)[1]))
    if len(hs) < 2:
        raise UserError("this SDXL export's text encoders lack hidden_states outputs; re-export it")
    return hs[-2]


def sdxl_prompt_encoder(
    tokenizers: list[Any], encoders: list[tuple[Any, list[str]]], zero_negative: bool
) -> Any:
    """(texts, negative) -> packed SDXL conditioning from two exported text encoders, on any runtime.

    `encoders`: per encoder, (run(input_ids int64 array, output names) -> arrays, its output names).
    Both encoders' penultimate hidden states side by side, and the second one's `text_embeds`
    (diffusers' encode_prompt); an empty negative prompt is zeros when `zero_negative`, as in
    diffusers' SDXL pipelines (`force_zeros_for_empty_prompt`).
    """
    import numpy as np

    names = [penultimate_output(outs) for _, outs in encoders]

    def encode(texts: list[str], negative: bool) -> torch.Tensor:
        hidden, pooled = [], None
        for k, (tok, (run, _), name) in enumerate(zip(tokenizers, encoders, names, strict=True)):
            ids = tokenize(tok, texts).numpy().astype(np.int64)
            last = k == len(encoders) - 1
            outs = run(ids, [name, "text_embeds"] if last else [name])
            hidden.append(torch.from_numpy(np.asarray(outs[0], dtype=np.float32)))
            if last:
                pooled = torch.from_numpy(np.asarray(outs[1], dtype=np.float32))
        cond = pack_cond(torch.cat(hidden, dim=-1), pooled)
        if negative and zero_negative:
            cond[[k for k, t in enumerate(texts) if not t]] = 0.0
        return cond

    return encode
