"""Write a diffusers SDXL pipeline as one original-format (SGM) `.safetensors` file, the layout most
shared SDXL checkpoints come in (`model.diffusion_model.*`, `first_stage_model.*`,
`conditioner.embedders.0.transformer.*`, `conditioner.embedders.1.model.*`). Tests use it to prove that
such a file loads as a base; it is the inverse of diffusers' single-file conversion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _unet_key(k: str, lpb: int, up_attn: set[int]) -> str:
    p = k.split(".")
    per = lpb + 1
    if p[0] in ("time_embedding", "add_embedding"):
        head = "time_embed" if p[0] == "time_embedding" else "label_emb.0"
        return f"{head}.{ {'linear_1': 0, 'linear_2': 2}[p[1]] }.{p[2]}"
    if p[0] == "conv_in":
        return "input_blocks.0.0." + p[1]
    if p[0] in ("conv_norm_out", "conv_out"):
        return f"out.{0 if p[0] == 'conv_norm_out' else 2}.{p[1]}"
    res = lambda rest: _RESNET.get(rest[0], rest[0]) + "." + ".".join(rest[1:])  # noqa: E731
    if p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{per * (i + 1)}.0.op." + ".".join(p[5:])
        j = int(p[3])
        sub, rest = ("0", res(p[4:])) if p[2] == "resnets" else ("1", ".".join(p[4:]))
        return f"input_blocks.{per * i + j + 1}.{sub}.{rest}"
    if p[0] == "mid_block":
        j = int(p[2])
        return f"middle_block.{2 * j if p[1] == 'resnets' else 1}." + (
            res(p[3:]) if p[1] == "resnets" else ".".join(p[3:])
        )
    if p[0] == "up_blocks":
        i = int(p[1])
        if p[2] == "upsamplers":
            return f"output_blocks.{per * i + lpb}.{2 if i in up_attn else 1}.conv." + ".".join(p[5:])
        j = int(p[3])
        sub, rest = ("0", res(p[4:])) if p[2] == "resnets" else ("1", ".".join(p[4:]))
        return f"output_blocks.{per * i + j}.{sub}.{rest}"
    raise KeyError(k)


def _vae_key(k: str, n_levels: int) -> tuple[str, bool]:
    """(ldm key, whether a linear attention weight becomes a 1x1 conv)."""
    p = k.split(".")
    simple = {"conv_norm_out": "norm_out"}
    if p[0] in ("quant_conv", "post_quant_conv"):
        return k, False
    side, rest = p[0], p[1:]
    if rest[0] in ("conv_in", "conv_out", "conv_norm_out"):
        return f"{side}.{simple.get(rest[0], rest[0])}.{rest[1]}", False
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{side}.mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:]), False
        tail = ".".join(rest[3:])
        for a, b in _VAE_ATTN.items():
            if tail.startswith(a + "."):
                return f"{side}.mid.attn_1.{b}.{tail[len(a) + 1 :]}", a != "group_norm" and tail.endswith(
                    "weight"
                )
    blocks = "down_blocks" if side == "encoder" else "up_blocks"
    if rest[0] == blocks:
        i = int(rest[1])
        level = i if side == "encoder" else n_levels - 1 - i
        name = "down" if side == "encoder" else "up"
        if rest[2] in ("downsamplers", "upsamplers"):
            return (
                f"{side}.{name}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{rest[5]}",
                False,
            )
        tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
        return f"{side}.{name}.{level}.block.{rest[3]}.{tail}", False
    raise KeyError(k)


def _openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k.startswith("text_model.encoder.layers."):
            n, rest = k.removeprefix("text_model.encoder.layers.").split(".", 1)
            base = f"transformer.resblocks.{n}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                continue  # written below as one in_proj tensor
            rest = (
                rest.replace("self_attn.out_proj", "attn.out_proj")
                .replace("layer_norm1", "ln_1")
                .replace("layer_norm2", "ln_2")
                .replace("mlp.fc1", "mlp.c_fc")
                .replace("mlp.fc2", "mlp.c_proj")
            )
            out[base + rest] = v
    layers = {k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")}
    for n in layers:
        pre = f"text_model.encoder.layers.{n}.self_attn."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{pre}{x}_proj.{kind}"] for x in ("q", "k", "v")]
            )
    return out


def write_sgm_checkpoint(pipe: Any, path: Path) -> Path:
    """`pipe` (a StableDiffusionXLPipeline) as one SGM-layout safetensors file."""
    from safetensors.torch import save_file

    cfg = pipe.unet.config
    up_attn = {i for i, t in enumerate(cfg.up_block_types) if "CrossAttn" in t}
    out = {
        "model.diffusion_model." + _unet_key(k, cfg.layers_per_block, up_attn): v
        for k, v in pipe.unet.state_dict().items()
    }
    n_levels = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        key, to_conv = _vae_key(k, n_levels)
        out["first_stage_model." + key] = v[:, :, None, None] if to_conv else v
    for k, v in pipe.text_encoder.state_dict().items():
        out["conditioner.embedders.0.transformer." + k] = v
    for k, v in _openclip(pipe.text_encoder_2.state_dict()).items():
        out["conditioner.embedders.1.model." + k] = v
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path
