"""Models by name: loading (hub id, local folder, single file or builtin name), the builtin registry
and fingerprints, in one import.

Every model argument in FineStyle goes through `load_sd_pipeline` or `load_captioner`. The same
code path loads `stable-diffusion-v1-5/stable-diffusion-v1-5` on a connected machine, a local
diffusers folder, or `builtin:tiny-sd` built offline from a config. Weights are read from
safetensors only and remote code is never trusted. The code lives in `builtins` (the registry),
`builtin_nets` (the builtins' architectures), `loading` and `fingerprints`.
"""

from __future__ import annotations

from finestyle.core.builtin_nets import (
    BLIP_SPECIAL_TOKENS,
    blip_text_ids,
    build_blip_processor,
    small_blip,
    write_byte_clip_tokenizer,
)
from finestyle.core.builtins import (
    BUILTIN_PREFIX,
    BUILTINS,
    SHA256SUMS,
    WEIGHTS_DIR,
    Builtin,
    build_builtin_captioner,
    build_builtin_pipeline,
    builtin_folder,
    is_builtin,
    pipeline_class,
    weights_dir,
    write_sha256sums,
)
from finestyle.core.fingerprints import model_fingerprint
from finestyle.core.loading import (
    SINGLE_FILE_CONFIG_ENV,
    load_captioner,
    load_clip,
    load_judge,
    load_sd_pipeline,
    load_tokenizers,
    model_family,
    offline_unless_hub_reachable,
    pick_device,
    pick_dtype,
    quiet_hf_logs,
    save_builtin,
)

__all__ = [
    "BLIP_SPECIAL_TOKENS",
    "BUILTINS",
    "BUILTIN_PREFIX",
    "Builtin",
    "SHA256SUMS",
    "SINGLE_FILE_CONFIG_ENV",
    "WEIGHTS_DIR",
    "blip_text_ids",
    "build_blip_processor",
    "build_builtin_captioner",
    "build_builtin_pipeline",
    "builtin_folder",
    "is_builtin",
    "load_captioner",
    "load_clip",
    "load_judge",
    "load_sd_pipeline",
    "load_tokenizers",
    "model_family",
    "model_fingerprint",
    "offline_unless_hub_reachable",
    "pick_device",
    "pick_dtype",
    "pipeline_class",
    "quiet_hf_logs",
    "save_builtin",
    "small_blip",
    "weights_dir",
    "write_byte_clip_tokenizer",
    "write_sha256sums",
]
