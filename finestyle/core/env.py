"""Environment hygiene: keep Prefect, Hugging Face and onnxruntime state local and off the network.

Nothing here runs at import time. The CLI calls `configure_environment()` once at start-up; tests
do the same from conftest. Values already set by the user always win (setdefault).
"""

from __future__ import annotations

import os
from pathlib import Path

from finestyle.core.errors import UserError

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


# Third-party warnings known to be benign on FineStyle's paths, hidden by the CLI unless --verbose.
# Each is (category, message regex); any other warning still shows.
BENIGN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch.onnx, while tracing diffusers' attention reshapes: indices are never negative there,
    # and every export proves its graph against PyTorch (parity) before it is published.
    (UserWarning, r"Exporting aten::index operator of advanced indexing"),
    (UserWarning, r"Constant folding - Only steps=1 can be constant folded"),
    # optimum's ORT pipelines read config values the way diffusers has deprecated for 1.0.
    (FutureWarning, r"Accessing config attribute `\w+` directly via 'ORT"),
    # optimum's notice that the exported pipeline has no safety checker (none is exported, by design).
    (UserWarning, r".*safety.checker"),
)


def quiet_output(verbose: bool = False) -> None:
    """The CLI's quiet mode: hide the benign warnings above and the libraries' progress bars
    (diffusers' component loading, datasets' saving), so that a command prints its own progress and
    results. `verbose` keeps everything. Library callers are not affected unless they call this."""
    if verbose:
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "warning")  # the CLI's default is "error"
        return
    import warnings

    for category, message in BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    os.environ["FINESTYLE_QUIET"] = "1"  # core.models turns diffusers' bars off when it loads


def quiet_progress_bars() -> None:
    """Turn diffusers' progress bars off when the CLI runs quiet (called before loading pipelines)."""
    if os.environ.get("FINESTYLE_QUIET") == "1":
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()


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


INT8_CPU_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")
"""CPU features with int8 dot products (Intel AMX; AVX-512 VNNI and AVX-VNNI on Intel and AMD)."""


def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AMX or AVX-512 BF16), so bf16 is a speed-up; elsewhere
    PyTorch emulates it, several times slower than fp32."""
    return any(f in cpu_flags() for f in BF16_CPU_FLAGS)


def check_port_free(host: str, port: int) -> None:
    """A UserError naming the address when nothing can listen on it (as uvicorn would bind it)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); stop what uses that port or "
                "pass another --port"
            ) from None
