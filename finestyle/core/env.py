"""Environment hygiene: keep Prefect, Hugging Face and onnxruntime state local and off the network.

Nothing here runs at import time. The CLI calls `configure_environment()` once at start-up; tests
do the same from conftest. Values already set by the user always win (setdefault).
"""

from __future__ import annotations

import os
from pathlib import Path

QUIET_DEFAULTS = {
    # Prefect 3 tries to reach a telemetry host unless told not to.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # The first temporary local API run migrates its database: allow for a slow CPU.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # diffusers logs at import that `optimum` has two distributions (optimum and optimum-onnx, by
    # design); its errors still show. Set DIFFUSERS_VERBOSITY=warning to see its warnings again.
    "DIFFUSERS_VERBOSITY": "error",
}


def state_dir() -> Path:
    """Where FineStyle keeps local tool state: $FINESTYLE_HOME or ./.finestyle."""
    return Path(os.environ.get("FINESTYLE_HOME", ".finestyle")).absolute()


def configure_environment(offline: bool | None = None) -> dict[str, str]:
    """Set the quiet, local defaults for this process and return what was set.

    Args:
        offline: True sets HF_HUB_OFFLINE=1 (no hub lookups at all); None leaves it as is.
    """
    home = state_dir()
    values = dict(QUIET_DEFAULTS)
    values["PREFECT_HOME"] = str(home / "prefect")
    if offline:
        values["HF_HUB_OFFLINE"] = "1"
    applied = {}
    for k, v in values.items():
        if k not in os.environ:
            os.environ[k] = v
            applied[k] = v
    # Prefect creates only the last level of PREFECT_HOME; a missing parent makes its temporary
    # server fail to open its database (and time out after 90 s). Create the whole path.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    return applied


def cpu_name() -> str:
    """The CPU model and core count, as recorded beside every measured figure."""
    import platform

    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def library_versions(*names: str) -> dict[str, str | None]:
    """Installed versions of finestyle and the named distributions (None where one is missing), for
    the provenance of every report."""
    import importlib.metadata as md

    from finestyle import __version__

    out: dict[str, str | None] = {"finestyle": __version__}
    for n in names or ("torch", "diffusers", "transformers", "peft", "onnxruntime", "optimum"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def gpu_name() -> str | None:
    """The CUDA device's name, or None without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU features with bf16 arithmetic (Intel AMX; AVX-512 BF16 on Intel and AMD)."""
