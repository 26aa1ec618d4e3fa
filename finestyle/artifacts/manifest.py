"""The export folder's manifest: its name, the ONNX layout and the check that a folder is a whole export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finestyle.core.errors import UserError
from finestyle.core.fs import read_json, sha256_file
from finestyle.core.sd import SDXL, unet_family

MANIFEST = "manifest.json"
"""Written last by `finestyle export`: a folder without it is not an export."""
ONNX_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
"""optimum's Stable Diffusion layout under onnx/."""
ONNX_COMPONENTS_SDXL = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
"""optimum's SDXL layout under onnx/ (what ORTStableDiffusionXLPipeline loads)."""


def external_data_paths(onnx_path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    locs = []
    for init in m.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for kv in init.external_data:
                if kv.key == "location":
                    locs.append(kv.value)
    return locs


def verify_export(folder: str | Path, deep: bool = True) -> dict[str, Any]:
    """Check an export folder against its manifest: every file present with its sha256, no unlisted
    model files, ONNX external data inside the folder. Raises UserError naming the problem."""
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if not mpath.exists():
        raise UserError(
            f"{str(folder)!r} is not a FineStyle export (no manifest.json; an interrupted export "
            "leaves none); re-run `finestyle export`"
        )
    try:
        manifest = read_json(mpath)
    except ValueError as exc:
        raise UserError(f"{mpath}: manifest is not valid JSON ({exc})") from exc
    files = manifest.get("files", {})
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            raise UserError(
                f"export {str(folder)!r} is incomplete: {rel} is missing; re-run `finestyle export`"
            )
        if deep and sha256_file(p) != digest:
            raise UserError(f"export {str(folder)!r} was modified: {rel} does not match its manifest sha256")
    for p in folder.rglob("*.onnx"):
        rel = p.relative_to(folder).as_posix()
        if rel not in files:
            raise UserError(f"export {str(folder)!r}: {rel} is not listed in the manifest")
        for loc in external_data_paths(p):
            target = (p.parent / loc).resolve()
            if Path(loc).is_absolute() or not target.is_relative_to(folder.resolve()):
                raise UserError(
                    f"export {str(folder)!r}: {rel} points its external data outside the folder "
                    f"({loc}); refusing to load it"
                )
    return manifest


def export_layout(onnx_dir: Path) -> dict[str, Any]:
    """What the loop needs from an export's onnx/ folder besides the graphs (tokenizer, scheduler, sizes)."""
    from transformers import AutoTokenizer, CLIPTokenizer

    tok_dir = onnx_dir / "tokenizer"
    tok_cfg = (
        json.loads((tok_dir / "tokenizer_config.json").read_text())
        if (tok_dir / "tokenizer_config.json").is_file()
        else {}
    )
    # SD's own tokenizer stays the slow CLIPTokenizer diffusers uses; others (e.g. word-level) load by class.
    tok_cls = (
        CLIPTokenizer if tok_cfg.get("tokenizer_class", "CLIPTokenizer") == "CLIPTokenizer" else AutoTokenizer
    )
    unet_cfg = json.loads((onnx_dir / "unet" / "config.json").read_text())
    vae_cfg = json.loads((onnx_dir / "vae_decoder" / "config.json").read_text())
    index_path = onnx_dir / "model_index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    family = unet_family(unet_cfg)
    layout = {
        "tokenizer": tok_cls.from_pretrained(tok_dir),
        "scheduler_config": json.loads((onnx_dir / "scheduler" / "scheduler_config.json").read_text()),
        "scaling_factor": float(vae_cfg.get("scaling_factor", 0.18215)),
        "vae_scale": 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1),
        "latent_channels": int(unet_cfg.get("in_channels", 4)),
        "native_size": int(unet_cfg.get("sample_size", 64)),
        "family": family,
        "unet_config": unet_cfg,
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", family == SDXL)),
    }
    if family == SDXL:
        layout["tokenizer_2"] = CLIPTokenizer.from_pretrained(onnx_dir / "tokenizer_2")
    return layout


def export_native_size(folder: str | Path) -> int | None:
    """The image side the export's model was trained at (UNet sample_size x VAE factor), from its
    configs alone; None when the folder has none."""
    onnx_dir = Path(folder) / "onnx"
    try:
        unet_cfg = json.loads((onnx_dir / "unet" / "config.json").read_text())
        vae_cfg = json.loads((onnx_dir / "vae_decoder" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return int(unet_cfg.get("sample_size", 64)) * 2 ** (
        len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1
    )


def onnx_components(family: str) -> tuple[str, ...]:
    """optimum's layout under onnx/ for a model family."""
    return ONNX_COMPONENTS_SDXL if family == SDXL else ONNX_COMPONENTS
