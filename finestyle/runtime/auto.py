"""`--runtime auto`: the fastest path this machine has that the export itself verified.

The choice, in order:

1. a CUDA GPU with onnxruntime's TensorRT or CUDA provider installed: onnxruntime on those providers
   (not yet run on a GPU);
2. OpenVINO installed and the export's OpenVINO check passed at a precision the CPU runs natively:
   int8 where its quality guard passed and the CPU has int8 dot products (VNNI / AMX), else bf16 where
   the CPU has bf16 units (AMX / AVX-512 BF16);
3. otherwise onnxruntime fp32 on the CPU: the path whose images equal the export's parity checks.

The choice is a pure function of the export's manifest and what the machine has (CPU flags, installed
packages, GPU), so tests inject each case; `describe` gives the one line that says what and why.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from finestyle.core.env import BF16_CPU_FLAGS, INT8_CPU_FLAGS, cpu_flags


@dataclass(frozen=True)
class Machine:
    """What the choice depends on, besides the export."""

    flags: frozenset[str]
    openvino: bool
    ort_providers: tuple[str, ...]
    cuda: bool
    gpu_name: str = ""


@dataclass(frozen=True)
class Choice:
    """A runtime, its precision (torch/openvino `--dtype`) and providers, and why it was chosen."""

    runtime: str
    dtype: str | None
    providers: list[str] | None = None
    reason: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def label(self, backend_name: str) -> str:
        """The runtime line: `openvino[CPU,bf16] (auto: AMX bf16, export check 3.2e-03)`."""
        return f"{backend_name} (auto: {self.reason})" if self.reason else backend_name


def this_machine() -> Machine:
    """The machine as the choice sees it: CPU flags, OpenVINO, onnxruntime's providers, a CUDA GPU."""
    providers: tuple[str, ...] = ()
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        providers = tuple(ort.get_available_providers())
    cuda, name = False, ""
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
        name = torch.cuda.get_device_name() if cuda else ""
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU for this choice
        cuda = False
    return Machine(
        flags=cpu_flags(),
        openvino=importlib.util.find_spec("openvino") is not None,
        ort_providers=providers,
        cuda=cuda,
        gpu_name=name,
    )


def _unit(flags: frozenset[str], wanted: tuple[str, ...]) -> str:
    names = {
        "amx_bf16": "AMX",
        "avx512_bf16": "AVX-512 BF16",
        "amx_int8": "AMX",
        "avx512_vnni": "AVX-512 VNNI",
    }
    for f in wanted:
        if f in flags:
            return names.get(f, f.upper().replace("_", "-"))
    return ""


def _ov_check(manifest: dict[str, Any], precision: str) -> dict[str, Any]:
    return (((manifest.get("openvino") or {}).get("checks")) or {}).get(precision) or {}


def choose_runtime(manifest: dict[str, Any], machine: Machine | None = None) -> Choice:
    """The runtime `--runtime auto` runs an export on, on `machine` (default: this one)."""
    m = this_machine() if machine is None else machine
    gpu_eps = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in m.ort_providers]
    if m.cuda and gpu_eps:
        short = "+".join(p.removesuffix("ExecutionProvider") for p in gpu_eps)
        return Choice(
            "onnxruntime",
            None,
            [*gpu_eps, "CPUExecutionProvider"],
            f"CUDA GPU {m.gpu_name or ''}".strip() + f", {short}; not yet run on a GPU",
        )
    cpu_note = "fp32 onnxruntime, the export's parity path"
    if not m.openvino:
        return Choice("onnxruntime", None, None, f"OpenVINO not installed; {cpu_note}")
    int8, bf16 = _ov_check(manifest, "int8"), _ov_check(manifest, "bf16")
    int8_unit = _unit(m.flags, INT8_CPU_FLAGS)
    if int8.get("pass") and int8_unit:
        diff = int8.get("mean_abs_diff")
        figure = f", export guard {diff:.1e}" if isinstance(diff, float) else ", export guard passed"
        return Choice("openvino", "int8", None, f"{int8_unit} int8{figure}", {"check": int8})
    bf16_unit = _unit(m.flags, BF16_CPU_FLAGS)
    if not bf16_unit:
        return Choice("onnxruntime", None, None, f"CPU without bf16 units; {cpu_note}")
    if not bf16:
        return Choice("onnxruntime", None, None, f"export has no OpenVINO bf16 check; {cpu_note}")
    diff = bf16.get("mean_abs_diff")
    figure = f"{diff:.1e}" if isinstance(diff, float) else "?"
    if not bf16.get("pass"):
        return Choice(
            "onnxruntime", None, None, f"export's OpenVINO bf16 check failed ({figure}); {cpu_note}"
        )
    return Choice("openvino", "bf16", None, f"{bf16_unit} bf16, export check {figure}", {"check": bf16})
