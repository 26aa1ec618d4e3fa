"""onnxruntime and TensorRT helpers shared by export, runtime and the benchmarks.

Both runtimes are optional and heavy, so they are imported inside the functions that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finestyle.core.errors import UserError


def ort_providers(prefer: list[str] | None = None) -> list[str]:
    """Execution providers in the order TensorRT, CUDA, CPU, limited to what is installed."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    order = prefer or ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in order if p in avail] or ["CPUExecutionProvider"]


def ort_session(path: Path, providers: list[str] | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=providers or ["CPUExecutionProvider"])


def require_tensorrt() -> Any:
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        raise UserError(
            "--format tensorrt needs TensorRT (pip install 'finestyle[tensorrt]' on a machine with "
            "an NVIDIA GPU); use --format onnx here"
        ) from None
    return trt
