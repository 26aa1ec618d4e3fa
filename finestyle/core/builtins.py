"""The builtin model registry: `builtin:` names, trained weights shipped under `finestyle/weights`
(verified against their SHA256SUMS), and saving a builtin as an ordinary diffusers/transformers folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finestyle.core.builtin_nets import (
    blip_base_random,
    sd15_random_components,
    sdxl_random_components,
    seeded,
    tiny_blip,
    tiny_clip,
    tiny_sd_components,
    tiny_sdxl_components,
)
from finestyle.core.errors import ModelLoadError
from finestyle.core.fs import hash_tree
from finestyle.core.mmdit import tiny_flux_components, tiny_sd3_components
from finestyle.core.sd import FLUX, SD, SD3, SDXL

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Builtin:
    """A builtin: a random-weight preset built from a config, or trained weights shipped in the package."""

    name: str
    kind: str  # "text-to-image", "captioner" or "judge"
    description: str
    build: Callable[[], Any] | None = None
    folder: str = ""  # trained builtins: folder under WEIGHTS_DIR, with its SHA256SUMS
    family: str = SD  # text-to-image builtins: `sd`, `sdxl`, `sd3` or `flux` (finestyle.core.sd)


# Trained builtins ship here, each folder in its ordinary save_pretrained layout plus SHA256SUMS.
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


SHA256SUMS = "SHA256SUMS"


def weights_dir() -> Path:
    """Where trained builtins are read from: $FINESTYLE_WEIGHTS_DIR, else the package's own weights."""
    return Path(os.environ.get("FINESTYLE_WEIGHTS_DIR") or WEIGHTS_DIR)


def builtin_folder(name: str) -> Path:
    """The verified folder of a trained builtin: every file's sha256 must match its SHA256SUMS line."""
    b = BUILTINS[name]
    folder = weights_dir() / b.folder
    sums = folder / SHA256SUMS
    if not sums.is_file():
        raise ModelLoadError(
            f"{name}: its weights are not installed ({sums} is missing); reinstall FineStyle from a "
            f"full checkout, or train them with `finestyle world train --model {b.folder.removeprefix('world-')}`"
        )
    expected = dict(reversed(line.split(None, 1)) for line in sums.read_text().splitlines() if line.strip())
    actual = hash_tree(folder, exclude=(SHA256SUMS,))
    for rel in sorted(set(expected) | set(actual)):
        if expected.get(rel) != actual.get(rel):
            what = (
                "is missing"
                if rel not in actual
                else "is not listed"
                if rel not in expected
                else "does not match its sha256"
            )
            raise ModelLoadError(
                f"{name}: {folder / rel} {what} in {sums}; the weights are corrupted or were edited, "
                "restore them from a clean checkout (`git checkout -- finestyle/weights`)"
            )
    return folder


def write_sha256sums(folder: str | os.PathLike) -> Path:
    """Record the sha256 of every file in `folder` (the format of `sha256sum`), for `builtin_folder`."""
    folder = Path(folder)
    lines = [f"{h}  {rel}" for rel, h in hash_tree(folder, exclude=(SHA256SUMS,)).items()]
    (folder / SHA256SUMS).write_text("\n".join(lines) + "\n")
    return folder / SHA256SUMS


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin(
            "builtin:tiny-sd",
            "text-to-image",
            "tiny Stable Diffusion (UNet 32/64 ch with cross-attention, VAE, CLIP text, DDIM); "
            "random weights, CPU-fast",
            tiny_sd_components,
        ),
        Builtin(
            "builtin:sd15-random",
            "text-to-image",
            "Stable Diffusion 1.5 architecture (860M UNet, VAE, CLIP ViT-L text) with random "
            "weights, for benchmarks",
            sd15_random_components,
        ),
        Builtin(
            "builtin:tiny-sdxl",
            "text-to-image",
            "tiny SDXL (two CLIP text encoders, text_time conditioning, UNet 32/64 ch, VAE, Euler); "
            "random weights, CPU-fast",
            tiny_sdxl_components,
            family=SDXL,
        ),
        Builtin(
            "builtin:sdxl-random",
            "text-to-image",
            "SDXL base architecture (2.6B UNet, CLIP ViT-L + OpenCLIP bigG text, VAE) with random "
            "weights, for benchmarks and memory figures",
            sdxl_random_components,
            family=SDXL,
        ),
        Builtin(
            "builtin:tiny-sd3",
            "text-to-image",
            "tiny Stable Diffusion 3.5 (MMDiT with 2 joint blocks, CLIP-L + CLIP-G + T5 text, VAE, "
            "flow-matching Euler); random weights, CPU-fast",
            tiny_sd3_components,
            family=SD3,
        ),
        Builtin(
            "builtin:tiny-flux",
            "text-to-image",
            "tiny FLUX.1 (1 double-stream + 1 single-stream block, CLIP-L pooled + T5 text, VAE, "
            "flow-matching Euler); random weights, CPU-fast",
            tiny_flux_components,
            family=FLUX,
        ),
        Builtin(
            "builtin:tiny-blip",
            "captioner",
            "tiny BLIP captioner (ViT 64 px + 2-layer BERT decoder) with its processor",
            tiny_blip,
        ),
        Builtin(
            "builtin:blip-base-random",
            "captioner",
            "BLIP-base architecture (ViT-B/16 384 px + BERT-base decoder, 224M) with random "
            "weights, for benchmarks",
            blip_base_random,
        ),
        Builtin(
            "builtin:tiny-clip",
            "clip",
            "tiny CLIP (ViT 32 px + byte-level text) with random weights: eval's CLIP judge, offline",
            tiny_clip,
        ),
        Builtin(
            "builtin:world-sd",
            "text-to-image",
            "Stable Diffusion trained on the procedural world (64 px, 16x16 latents, word-level CLIP "
            "text); knows every style but the held-out one",
            folder="world-sd",
        ),
        Builtin(
            "builtin:world-blip",
            "captioner",
            "BLIP trained to caption world scenes with content words",
            folder="world-blip",
        ),
        Builtin(
            "builtin:world-judge",
            "judge",
            "ResNet multi-label classifier of the world: objects, backgrounds and styles",
            folder="world-judge",
        ),
    ]
}


def is_builtin(name: str) -> bool:
    return str(name).startswith(BUILTIN_PREFIX)


def get_builtin(name: str, kind: str) -> Builtin:
    b = BUILTINS.get(name)
    if b is None:
        known = ", ".join(BUILTINS)
        raise ModelLoadError(f"unknown builtin model {name!r}; known builtins: {known}")
    if b.kind != kind:
        raise ModelLoadError(f"{name!r} is a {b.kind} model, but a {kind} model is needed here")
    return b


def pipeline_class(family: str) -> Any:
    """The diffusers pipeline class of a family."""
    import diffusers

    return getattr(
        diffusers,
        {
            SDXL: "StableDiffusionXLPipeline",
            SD3: "StableDiffusion3Pipeline",
            FLUX: "FluxPipeline",
        }.get(family, "StableDiffusionPipeline"),
    )


def pipeline_extras(family: str) -> dict[str, Any]:
    """Constructor arguments beyond the components: no safety checker (sd), no watermarker (sdxl)."""
    if family == SDXL:
        return dict(add_watermarker=False)
    if family in (SD3, FLUX):
        return {}
    return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_builtin_pipeline(name: str) -> Any:
    """Build a builtin text-to-image preset as its family's pipeline (fp32, CPU, seeded)."""
    b = get_builtin(name, "text-to-image")
    cls = pipeline_class(b.family)
    if b.folder:
        return cls.from_pretrained(builtin_folder(name), use_safetensors=True, **pipeline_extras(b.family))
    with seeded(0):
        comps = b.build()
    for m in comps.values():  # as from_pretrained leaves them: no dropout (T5's config has 0.1)
        if isinstance(m, torch.nn.Module):
            m.eval()
    return cls(**comps, **pipeline_extras(b.family))


def build_builtin_captioner(name: str) -> tuple[Any, Any]:
    """Build a builtin captioner preset: (BlipForConditionalGeneration, BlipProcessor)."""
    b = get_builtin(name, "captioner")
    if b.folder:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        folder = builtin_folder(name)
        model = BlipForConditionalGeneration.from_pretrained(folder, use_safetensors=True)
        return model.eval(), BlipProcessor.from_pretrained(folder)
    with seeded(0):
        model, processor = b.build()
    return model.eval(), processor
