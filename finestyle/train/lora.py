"""The adapter: LoRA on the UNet's chosen projections, its state dict, and the adapter folder it is saved as."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, KOHYA_WEIGHTS
from finestyle.config import TrainConfig
from finestyle.config.train import target_regex_for
from finestyle.core.errors import FineStyleError, UserError
from finestyle.core.fs import write_json
from finestyle.core.models import pipeline_class
from finestyle.core.sd import (
    FLUX,
    MMDIT,
    SD3,
    SDXL,
    family_of_class,
    sgm_module_name,
    unet_family,
)


def net_family(net: Any) -> str:
    """The family of a denoiser: an SD 3.x or FLUX.1 transformer by its class, else its UNet config."""
    name = type(net).__name__
    return family_of_class(name) if "Transformer" in name else unet_family(net.config)


def add_lora(unet: Any, cfg: TrainConfig) -> Any:
    """Attach a peft LoRA adapter to the modules matching cfg.targets; return the LoraConfig.

    `unet` is the denoiser: a UNet, or an SD 3.x / FLUX.1 transformer (the presets mean the text
    stream's projections there: `config.train.MMDIT_TARGET_PRESETS`)."""
    from peft import LoraConfig

    family = net_family(unet)
    regex = target_regex_for(cfg.targets, family)
    names = [n for n, m in unet.named_modules() if re.fullmatch(regex, n) and isinstance(m, torch.nn.Linear)]
    if not names:
        example = (
            "transformer_blocks.0.attn.add_k_proj"
            if family in MMDIT
            else "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        )
        raise UserError(
            f"train.targets: {cfg.targets!r} matches no Linear module of this model (e.g. {example})"
        )
    init = {"gaussian": "gaussian", "default": True}[cfg.init]
    lcfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights=init,
        target_modules=regex,
    )
    unet.add_adapter(lcfg)
    return lcfg


def lora_state_dict(unet: Any) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state(unet: Any, state: dict[str, torch.Tensor]) -> None:
    """Load a peft-format LoRA state dict and check that every tensor landed (peft fails silently)."""
    from peft.utils import set_peft_model_state_dict

    res = set_peft_model_state_dict(unet, state)
    unexpected = getattr(res, "unexpected_keys", []) or []
    if unexpected:
        raise FineStyleError(f"checkpoint LoRA keys did not load: {unexpected[:3]}")
    now = lora_state_dict(unet)
    for k, v in state.items():
        if k not in now or not torch.equal(now[k].cpu(), v.cpu()):
            raise FineStyleError(f"checkpoint LoRA tensor {k} did not load")


def save_adapter(folder: Path, unet: Any, lcfg: Any, meta: dict[str, Any]) -> None:
    """diffusers LoRA format (+ adapter metadata so alpha survives reload), kohya copy, config.

    The kohya copy uses the family's own module names: diffusers' names for SD 1.x/2.x (which is
    what kohya's SD 1.5 LoRAs use) and the original SGM names (`input_blocks_4_1_...`) for SDXL.
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    family = net_family(unet)
    peft_sd = lora_state_dict(unet)
    if family in MMDIT:
        _save_mmdit_adapter(folder, family, peft_sd, lcfg, meta)
        return
    diff_sd = convert_state_dict_to_diffusers(peft_sd)
    pipeline_class(family).save_lora_weights(
        folder,
        unet_lora_layers=diff_sd,
        weight_name=ADAPTER_WEIGHTS,
        safe_serialization=True,
        unet_lora_adapter_metadata=lcfg.to_dict(),
    )
    if family == SDXL:
        lpb = int(unet.config.layers_per_block)
        peft_sd = {sgm_module_name(k, lpb): v for k, v in peft_sd.items()}
    # kohya / A1111 / ComfyUI naming: lora_unet_..., with alpha tensors per module
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    for k in list(kohya):
        if k.endswith(".lora_down.weight"):
            kohya[k.replace(".lora_down.weight", ".alpha")] = torch.tensor(float(lcfg.lora_alpha))
    save_file(
        {k: v.contiguous() for k, v in kohya.items()},
        str(folder / KOHYA_WEIGHTS),
        metadata={
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(lcfg.r),
            "ss_network_alpha": str(lcfg.lora_alpha),
            "ss_base_model_version": "sdxl_base_v1-0" if family == SDXL else "sd_v1",
            "finestyle_targets": str(meta.get("targets")),
        },
    )
    write_json(folder / "finestyle_adapter.json", meta)


# kohya's (and ComfyUI's) names for the text stream of a joint block, in the original checkpoints'
# layout, where q, k and v are one fused `qkv` Linear: BFL's FLUX and Stability's SD3 MMDiT.
_KOHYA_TEXT_ATTN = {
    FLUX: ("lora_unet_double_blocks_{i}_txt_attn_qkv", "lora_unet_double_blocks_{i}_txt_attn_proj"),
    SD3: (
        "lora_unet_joint_blocks_{i}_context_block_attn_qkv",
        "lora_unet_joint_blocks_{i}_context_block_attn_proj",
    ),
}


def kohya_mmdit(
    peft_sd: dict[str, torch.Tensor], family: str, alpha: float
) -> dict[str, torch.Tensor] | None:
    """The text stream's LoRA in kohya's fused-`qkv` naming; None when the adapter reaches elsewhere.

    A LoRA on add_k_proj and add_v_proj (rank r each) becomes one rank-3r LoRA on the fused qkv: its
    down matrix stacks [0; A_k; A_v] and its up matrix is block-diagonal [0, B_k, B_v], so that
    up @ down = [0; B_k A_k; B_v A_v], exactly the K/V update, and q's rows stay untouched. kohya
    scales by alpha / rank, so the fused alpha is 3 x alpha. diffusers' `load_lora_weights` reads
    this layout back for FLUX (its kohya converter splits a block-diagonal qkv LoRA exactly)."""
    qkv_key, proj_key = _KOHYA_TEXT_ATTN[family]
    blocks: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for k, v in peft_sd.items():
        m = re.fullmatch(
            r"transformer_blocks\.(\d+)\.attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)\.lora_(A|B)\.weight",
            k,
        )
        if m is None:
            return None
        i, proj, ab = int(m[1]), m[2], m[3]
        a, b = blocks.setdefault(i, {}).get(proj, (None, None))
        blocks[i][proj] = (v, b) if ab == "A" else (a, v)
    out: dict[str, torch.Tensor] = {}
    for i, projs in sorted(blocks.items()):
        if "to_add_out" in projs:
            a, b = projs.pop("to_add_out")
            out[proj_key.format(i=i) + ".lora_down.weight"] = a
            out[proj_key.format(i=i) + ".lora_up.weight"] = b
            out[proj_key.format(i=i) + ".alpha"] = torch.tensor(float(alpha))
        if not projs:
            continue
        a0, b0 = next(iter(projs.values()))
        r, d_in, d_out = a0.shape[0], a0.shape[1], b0.shape[0]
        down = torch.zeros(3 * r, d_in, dtype=a0.dtype)
        up = torch.zeros(3 * d_out, 3 * r, dtype=b0.dtype)
        for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            if name in projs:
                a, b = projs[name]
                down[j * r : (j + 1) * r] = a
                up[j * d_out : (j + 1) * d_out, j * r : (j + 1) * r] = b
        key = qkv_key.format(i=i)
        out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = down, up
        out[key + ".alpha"] = torch.tensor(3.0 * float(alpha))
    return out


def _save_mmdit_adapter(
    folder: Path, family: str, peft_sd: dict[str, torch.Tensor], lcfg: Any, meta: dict[str, Any]
) -> None:
    """An SD 3.x / FLUX.1 adapter: diffusers' format (`load_lora_weights` reads it), and kohya's
    fused-qkv copy when the adapter stays on the text stream's attention (the `kv` and `qkvo` presets)."""
    from safetensors.torch import save_file

    pipeline_class(family).save_lora_weights(
        folder,
        transformer_lora_layers={
            k.replace(".lora_A.", ".lora_A.").replace(".lora_B.", ".lora_B."): v for k, v in peft_sd.items()
        },
        weight_name=ADAPTER_WEIGHTS,
        safe_serialization=True,
        transformer_lora_adapter_metadata=lcfg.to_dict(),
    )
    kohya = kohya_mmdit(peft_sd, family, float(lcfg.lora_alpha))
    if kohya is not None:
        save_file(
            {k: v.contiguous() for k, v in kohya.items()},
            str(folder / KOHYA_WEIGHTS),
            metadata={
                "ss_network_module": "networks.lora_flux" if family == FLUX else "networks.lora_sd3",
                "ss_network_dim": str(3 * lcfg.r),
                "ss_network_alpha": str(3 * lcfg.lora_alpha),
                "ss_base_model_version": "flux1" if family == FLUX else "sd3",
                "finestyle_targets": str(meta.get("targets")),
            },
        )
    write_json(folder / "finestyle_adapter.json", {**meta, "family": family, "kohya": kohya is not None})
