"""What every backend is: the callables one denoising loop needs, and the runtimes that provide them."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from finestyle.config import RequestOptions
from finestyle.core.sd import (
    SD,
)

RUNTIMES = ("onnxruntime", "openvino", "torch", "tensorrt")


def log_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# What one generation asks for: config.RequestOptions, the one definition that `generate`'s options
# and the server's request bodies share.
GenerationRequest = RequestOptions


@dataclass
class Backend:
    """What the loop needs from a backend. Tensors in and out are CPU torch fp32."""

    name: str
    tokenizer: Any
    scheduler_config: dict[str, Any]
    scaling_factor: float
    vae_scale: int
    latent_channels: int
    native_size: int
    encode_text: Any  # (input_ids LongTensor) -> embeddings
    unet: Any  # (latents, t, emb) -> eps
    decode: Any  # (latents / scaling) -> images in [-1, 1]
    unet_base: Any | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    manifest_sha256: str | None = None
    parts: dict[str, Any] = field(default_factory=dict)  # the runtime's own objects (e.g. compiled models)
    # A swappable export: kv(emb, style names per row) -> K/V inputs, computed once per loop; `unet`
    # then takes those K/V in place of the embedding, and the base style serves style guidance.
    kv: Any | None = None
    styles: list[str] = field(default_factory=list)
    default_style: str | None = None
    reload: Any | None = None  # () -> styles: re-read a swappable export's styles (hot add/remove)
    # Styles a reload removed, still served to the requests accepted while they were live.
    retired_styles: list[str] = field(default_factory=list)
    family: str = SD
    # (texts, negative) -> conditioning rows; when set it replaces tokenizer + encode_text. SDXL
    # backends set it: two tokenizers, and the pooled embedding packed into the rows (core.sd).
    encode_prompts: Any | None = None
