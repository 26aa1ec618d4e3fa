"""`ExportConfig`: stage 3, the merged, verified export."""

from __future__ import annotations

from dataclasses import dataclass

from finestyle.config.base import check as _check
from finestyle.config.base import unkeyed


@dataclass
class ExportConfig:
    """Stage 3: merge the adapter, export ONNX (and TensorRT), prove parity."""

    base: str = unkeyed("builtin:tiny-sd")
    """Base text-to-image model the adapter was trained on."""
    adapter: str | None = unkeyed("runs/train/adapter")
    """Adapter folder from `train` (None: export the base model alone)."""
    out: str = unkeyed("exports/model")
    """Export folder: merged/, onnx/, [tensorrt/], manifest.json."""
    format: str = "onnx"
    """onnx | tensorrt (TensorRT also writes the ONNX it is built from)."""
    lora_scale: float = 1.0
    """Scale at which the adapter is fused."""
    fp16: bool = False
    """Half-precision ONNX weights/compute, inputs/outputs kept fp32; the VAE stays fp32 unless a
    probe proves its fp16 graph NaN-free and close. Meant for GPUs (CPU kernels are fp32)."""
    optimize: bool = False
    """Run onnxruntime's diffusion graph optimizer (CPU-safe fusions on CPU)."""
    with_base_unet: bool = False
    """Also export the un-adapted UNet (`onnx/unet_base`), needed for style guidance."""
    opset: int | None = None
    """ONNX opset (None: optimum's default)."""
    unet_atol: float = 1e-4
    """fp32 UNet parity: max |ORT - torch| allowed."""
    image_atol: float = 2e-3
    """Whole-image parity: max |ORT - torch| allowed, pixel values in [0, 1]."""
    merge_atol: float = 1e-4
    """Merged vs adapter UNet: max abs difference allowed (fp32)."""
    parity_steps: int = 4
    """Denoising steps of the whole-image parity check."""
    check_bf16: bool = True
    """Also measure the CPU bf16 torch path (merged/ in bf16 + channels_last) against fp32."""
    check_openvino: bool = True
    """When OpenVINO is installed, check its image against fp32 at the precision `--runtime openvino`
    picks on this CPU; recorded in the manifest (a failure marks that precision unusable, not the
    export)."""
    device: str = unkeyed("auto")
    """Device for merge and the PyTorch side of parity."""
    trt_static: bool = True
    """TensorRT: static shape profiles (faster) rather than dynamic ranges."""
    trt_refit: bool = False
    """TensorRT: build refittable engines (swap adapters without a rebuild)."""
    trt_batch: int = 1
    """TensorRT profile: images per request (UNet batch is 2x for guidance)."""
    trt_size: int | None = None
    """TensorRT profile: image side in pixels; default: the model's native size (512 SD 1.5, 1024 SDXL)."""
    force: bool = unkeyed(False)
    """Re-export even if an identical export is there."""
    register: str = unkeyed("")
    """mlflow | mlflow:NAME: register the export as an MLflow model version (a pyfunc that generates
    with this runtime; tags: manifest sha256, parity, base, adapter and dataset keys, eval figures),
    in the adapter's tracked training run when there is one. Default NAME: finestyle-STYLE."""
    tracking_uri: str = unkeyed("")
    """MLflow tracking URI for `register` (default: the training run's, else $MLFLOW_TRACKING_URI, else
    a SQLite store beside the export)."""

    def __post_init__(self) -> None:
        _check(self.format in ("onnx", "tensorrt"), "export.format", self.format, "use onnx or tensorrt")
        _check(self.lora_scale >= 0, "export.lora_scale", self.lora_scale, "must be >= 0")
        for name in ("unet_atol", "image_atol", "merge_atol"):
            _check(getattr(self, name) > 0, f"export.{name}", getattr(self, name), "must be > 0")
        _check(self.parity_steps >= 1, "export.parity_steps", self.parity_steps, "must be >= 1")
        _check(
            self.trt_size is None or self.trt_size % 8 == 0,
            "export.trt_size",
            self.trt_size,
            "must be a multiple of 8",
        )
