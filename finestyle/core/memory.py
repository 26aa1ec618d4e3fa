"""Host memory, estimated before a stage starts, so that a model too big for the machine is refused
with one line instead of being killed by the OOM killer halfway.

The estimates are from the model's parameter counts (read without loading any weights) and factors
measured on SD 1.5 and SDXL (README, "SDXL"):

- export: the merge holds the pipeline in fp32; optimum's exporter then holds the fp32 UNet, its
  traced graph and the serialised copy: about 4x the fp32 UNet, plus the other components once.
- train: the pipeline in fp32 while latents and text are cached, plus activations.
- prepare (attention concepts): the base pipeline in fp32, plus the captioner and one UNet pass at
  the native size.

Measured on `builtin:sdxl-random` (`finestyle bench stages`, 2-core CPU): prepare 16.1 GiB, 2 bf16
training steps at 512 px 14.1 GiB, against estimates of 17.0 and 15.9 GiB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finestyle.core.errors import UserError

GB = 1024**3
EXPORT_UNET_FACTOR = 4.0
OVERHEAD_BYTES = 1 * GB


def host_memory_bytes() -> int | None:
    """This machine's memory for the process: MemTotal, or the cgroup limit when lower."""
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except OSError:
        return None
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(f).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and total and int(raw) < total:
            total = int(raw)
    return total


def _count_module_params(obj: Any) -> int:
    return sum(p.numel() for p in obj.parameters()) if hasattr(obj, "parameters") else 0


def _safetensors_params(files: list[Path]) -> int:
    from safetensors import safe_open

    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                size = 1
                for d in shape:
                    size *= int(d)
                n += size
    return n


def component_params(name: str) -> dict[str, int] | None:
    """Parameters per component (`unet`, `text_encoder`, ...) of a text-to-image model, without
    loading its weights; None when it cannot be known here (e.g. a hub id not yet downloaded)."""
    from finestyle.core import models

    name = str(name)
    if models.is_builtin(name):
        b = models.BUILTINS.get(name)
        if b is None or b.kind != "text-to-image":
            return None
        if b.folder:
            return _folder_params(models.builtin_folder(name))
        from accelerate import init_empty_weights

        with init_empty_weights():  # parameters on the meta device: counted, never allocated
            comps = b.build()
        return {k: _count_module_params(v) for k, v in comps.items() if _count_module_params(v)}
    p = Path(name).expanduser()
    if p.is_dir():
        return _folder_params(p)
    if p.is_file() and p.suffix == ".safetensors":
        return _single_file_params(p)
    return None


def _folder_params(folder: Path) -> dict[str, int] | None:
    out = {}
    for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
        files = sorted(sub.glob("*.safetensors"))
        # a component saved in fp16 and fp32 variants: count one of them
        plain = [f for f in files if ".fp16." not in f.name] or files
        if plain:
            out[sub.name] = _safetensors_params(plain)
    return out or None


def _single_file_params(path: Path) -> dict[str, int]:
    from safetensors import safe_open

    out: dict[str, int] = {}
    with safe_open(str(path), framework="pt") as st:
        for k in st.keys():
            comp = "unet" if k.startswith("model.diffusion_model.") else "other"
            size = 1
            for d in st.get_slice(k).get_shape():
                size *= int(d)
            out[comp] = out.get(comp, 0) + size
    return out


def estimate_bytes(stage: str, params: dict[str, int]) -> int:
    """Peak host memory of `stage` (export | train | prepare) from fp32 parameter counts."""
    net = "unet" if "unet" in params else "transformer"  # SD 3.x / FLUX.1: the MMDiT transformer
    unet = params.get(net, 0) * 4
    rest = sum(v for k, v in params.items() if k != net) * 4
    if stage == "export":
        return int(EXPORT_UNET_FACTOR * unet + rest + OVERHEAD_BYTES)
    factor = 1.25 if stage == "prepare" else 1.15
    return int(factor * (unet + rest) + OVERHEAD_BYTES)


def check_fits(
    stage: str, model: str, hint: str, log: Any = None, exclude: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """Refuse `stage` on `model` with one line when its estimated peak clearly exceeds this machine's
    memory. Returns the estimate (GB) for reports, or None when it cannot be estimated.

    FINESTYLE_MEMORY_GUARD=0 turns the refusal into a warning (e.g. on a machine with large swap)."""
    params = component_params(model)
    if params:
        params = {k: v for k, v in params.items() if k not in exclude}  # components left unloaded
    host = host_memory_bytes()
    if not params or not host:
        return None
    need = estimate_bytes(stage, params)
    rep = {"estimate_gb": round(need / GB, 1), "host_gb": round(host / GB, 1)}
    if need > host:
        msg = (
            f"{stage}: {model} needs about {need / GB:.0f} GB of host memory, this machine has "
            f"{host / GB:.0f} GB; {hint}"
        )
        if os.environ.get("FINESTYLE_MEMORY_GUARD", "1") == "0":
            if log:
                log(f"warning: {msg} (FINESTYLE_MEMORY_GUARD=0: going on)")
            return rep
        raise UserError(msg)
    return rep
