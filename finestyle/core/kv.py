"""Cross-attention K/V as inputs: the shared UNet of a style-swappable export.

A FineStyle adapter changes only the cross-attention key and value projections (`attn2.to_k`,
`attn2.to_v`), and those act only on the text embedding. So a style changes nothing but the K and V
tensors computed from the prompt, once per request: one UNet graph that takes them as inputs serves
every style, and several styles in one batch.

`KVUNet` wraps a diffusers UNet: each `attn2.to_k` / `to_v` becomes a slot that returns the tensor
given for it, and diffusers' own attention processor runs unchanged around it. `project_kv` computes
those tensors from a text embedding: E·Wᵀ (+ bias) for the base model, plus s·(E·Aᵀ)·Bᵀ for a LoRA
style, without materialising a merged weight per style.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finestyle.core.errors import UserError


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Module names of the UNet's cross-attention blocks (`...attn2`), in module order."""
    names = []
    for name, mod in unet.named_modules():
        if name.endswith("attn2") and hasattr(mod, "to_k") and hasattr(mod, "to_v"):
            if getattr(mod, "norm_cross", None) is not None:
                raise UserError(
                    f"{name} normalises the text embedding before K/V; a swappable export needs "
                    "K/V as plain projections of the embedding (SD 1.x/2.x)"
                )
            names.append(name)
    if not names:
        raise UserError("the UNet has no cross-attention (attn2) blocks to take K/V as inputs")
    return names


def base_kv_weights(unet: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
    """`{layer}.to_k.weight` / `.to_v.weight` (and biases, where present) of the base UNet, fp32."""
    out = {}
    mods = dict(unet.named_modules())
    for name in layers:
        for proj in ("to_k", "to_v"):
            lin = mods[f"{name}.{proj}"]
            lin = getattr(lin, "base_layer", lin)  # a peft-wrapped layer: its frozen base
            out[f"{name}.{proj}.weight"] = lin.weight.detach().float().cpu().contiguous()
            if lin.bias is not None:
                out[f"{name}.{proj}.bias"] = lin.bias.detach().float().cpu().contiguous()
    return out


class _Slot(nn.Module):
    """Stands in for a K or V projection: returns the tensor given for this layer."""

    def __init__(self, store: dict[str, Any], index: int) -> None:
        super().__init__()
        self.store, self.index = store, index

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.store["kv"][self.index]


class KVUNet(nn.Module):
    """forward(sample, timestep, *kv) with kv = (K_0, V_0, K_1, V_1, ...) per cross-attention layer.

    Takes the UNet over (its to_k / to_v modules are replaced; keep no other reference to it)."""

    def __init__(self, unet: nn.Module, layers: list[str]) -> None:
        super().__init__()
        self.unet, self.layers = unet, layers
        self.store: dict[str, Any] = {"kv": ()}
        mods = dict(unet.named_modules())
        for i, name in enumerate(layers):
            attn = mods[name]
            attn.to_k = _Slot(self.store, 2 * i)
            attn.to_v = _Slot(self.store, 2 * i + 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        self.store["kv"] = kv
        # The text embedding reaches only the replaced projections; the processor still reads the
        # batch size from it, so a one-token slice of the first K stands in for it.
        try:
            return self.unet(sample, timestep, encoder_hidden_states=kv[0][:, :1]).sample
        finally:
            self.store["kv"] = ()


@dataclass
class StyleKV:
    """A style's K/V projections: the base weights plus, per projection, an optional LoRA (A, B, s)."""

    name: str
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # "{layer}.to_k" -> (A, B, scale)


def project_kv(
    emb: torch.Tensor, layers: list[str], base: dict[str, torch.Tensor], styles: list[StyleKV]
) -> list[torch.Tensor]:
    """K/V inputs for a batch whose row i is in style `styles[i]` (one per row of `emb`).

    Rows sharing a style are projected together; the result is (K_0, V_0, K_1, ...) in row order."""
    if len(styles) != emb.shape[0]:
        raise ValueError(f"project_kv: {len(styles)} styles for {emb.shape[0]} rows")
    emb = emb.float()
    groups: dict[str, list[int]] = {}
    for i, st in enumerate(styles):
        groups.setdefault(st.name, []).append(i)
    by_name = {st.name: st for st in styles}
    out = []
    for name in layers:
        for proj in ("to_k", "to_v"):
            key = f"{name}.{proj}"
            w, b = base[f"{key}.weight"], base.get(f"{key}.bias")
            full = emb @ w.T
            if b is not None:
                full = full + b
            for sname, rows in groups.items():
                lora = by_name[sname].lora.get(key)
                if lora is None:
                    continue
                a, bb, s = lora
                idx = torch.tensor(rows)
                full[idx] = full[idx] + s * ((emb[idx] @ a.T) @ bb.T)
            out.append(full.contiguous())
    return out
