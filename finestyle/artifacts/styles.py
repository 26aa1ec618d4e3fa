"""Styles of a style-swappable export: `styles/NAME/` beside one shared UNet graph with K/V inputs.

Layout of a swappable export (its manifest has `"kind": "swappable"`):

    manifest.json           sha256 of every file below; `swappable.layers` and `swappable.styles`
    merged/                 the base model (diffusers folder): the identity style, and what a new
                            style's LoRA is read against
    kv/base.safetensors     the base K/V projection weights of every cross-attention layer
    onnx/unet_kv/model.onnx the shared UNet: inputs sample, timestep, kv_0 .. kv_{2L-1}
    onnx/text_encoder, vae_decoder, vae_encoder, tokenizer, scheduler   as in a plain export
    styles/NAME/kv_lora.safetensors   per projection `{layer}.to_k.lora_A` / `.lora_B`
    styles/NAME/style.json  style text, concepts, LoRA scales, base fingerprint, adapter fingerprint

The base model is the style named `base` (no files: the base K/V weights alone).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from finestyle.core.errors import UserError
from finestyle.core.fs import read_json
from finestyle.core.kv import StyleKV

KV_BASE = "kv/base.safetensors"
KV_UNET = "onnx/unet_kv/model.onnx"
STYLE_WEIGHTS = "kv_lora.safetensors"
STYLE_INFO = "style.json"
BASE_STYLE = "base"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def style_slug(text: str) -> str:
    """A style name from its text: "watercolor painting" -> "watercolor-painting"."""
    slug = re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")[:64]
    return slug or "style"


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or name == BASE_STYLE:
        raise UserError(
            f"style name {name!r}: use 1-64 lowercase letters, digits, '-' or '_' (and not {BASE_STYLE!r})"
        )
    return name


def is_swappable(manifest: dict[str, Any]) -> bool:
    return manifest.get("kind") == "swappable"


def style_names(manifest: dict[str, Any]) -> list[str]:
    return [BASE_STYLE, *sorted((manifest.get("swappable") or {}).get("styles", {}))]


def load_base_kv(export_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(export_dir / KV_BASE))


def load_style(export_dir: Path, name: str, manifest: dict[str, Any]) -> StyleKV:
    """A style's LoRA factors (its files were hash-checked with the export's manifest)."""
    from safetensors.torch import load_file

    if name == BASE_STYLE:
        return StyleKV(BASE_STYLE, {})
    styles = manifest["swappable"]["styles"]
    if name not in styles:
        raise UserError(f"unknown style {name!r}; this export has: {', '.join(style_names(manifest))}")
    folder = export_dir / "styles" / name
    info = read_json(folder / STYLE_INFO)
    if info.get("base_fingerprint") != manifest.get("base_fingerprint"):
        raise UserError(
            f"style {name!r} was made for another base model than this export's (fingerprints differ); "
            "refusing to load it"
        )
    tensors = load_file(str(folder / STYLE_WEIGHTS))
    lora = {
        key: (tensors[f"{key}.lora_A"].float(), tensors[f"{key}.lora_B"].float(), float(scale))
        for key, scale in info["scales"].items()
    }
    return StyleKV(name, lora)


def verify_styles(export_dir: Path, manifest: dict[str, Any]) -> None:
    """sha256 of every style file against the manifest (the fast check of a reload: the big, shared
    files are checked at start-up and do not change while styles come and go)."""
    from finestyle.core.fs import sha256_file

    for rel, digest in manifest.get("files", {}).items():
        if rel.startswith("styles/") and sha256_file(export_dir / rel) != digest:
            raise UserError(f"export {str(export_dir)!r}: {rel} does not match its manifest sha256")
