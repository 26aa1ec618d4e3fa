"""The adapter: LoRA on the UNet's chosen projections, its state dict, and the adapter folder it is saved as."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, KOHYA_WEIGHTS
from finestyle.config import TrainConfig
from finestyle.core.errors import FineStyleError, UserError
from finestyle.core.fs import write_json
from finestyle.core.models import pipeline_class
from finestyle.core.sd import (
    SDXL,
    sgm_module_name,
    unet_family,
)


def add_lora(unet: Any, cfg: TrainConfig) -> Any:
    """Attach a peft LoRA adapter to the modules matching cfg.targets; return the LoraConfig."""
    from peft import LoraConfig

    names = [
        n
        for n, m in unet.named_modules()
        if re.fullmatch(cfg.target_regex, n) and isinstance(m, torch.nn.Linear)
    ]
    if not names:
        raise UserError(
            f"train.targets: {cfg.targets!r} matches no Linear module of this UNet "
            "(e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k)"
        )
    init = {"gaussian": "gaussian", "default": True}[cfg.init]
    lcfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights=init,
        target_modules=cfg.target_regex,
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

    family = unet_family(unet.config)
    peft_sd = lora_state_dict(unet)
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
