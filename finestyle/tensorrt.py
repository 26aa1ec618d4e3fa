"""TensorRT engines from the exported ONNX files (written against TensorRT's documented Python API).

NOT RUN IN THIS WORKPLACE: TensorRT cannot be installed here (no wheels within reach, no GPU on the
development machines). The code follows the TensorRT 10 Python API (Builder, OnnxParser, optimization
profiles, timing cache, REFIT flag) and is imported lazily; without TensorRT the export exits 2 with
one line. Tests marked `tensorrt` skip without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError
from .fsutil import write_json


def require_tensorrt() -> Any:
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        raise UserError(
            "--format tensorrt needs TensorRT (pip install 'finestyle[tensorrt]' on a machine with "
            "an NVIDIA GPU); use --format onnx here"
        ) from None
    return trt


def _profiles(
    component: str, cfg: Any, hidden: int = 768
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes per input. Static by default (min = opt = max), which runs faster."""
    b = cfg.trt_batch
    lat = cfg.trt_size // 8
    shapes = {
        "text_encoder": {"input_ids": (b * 2, 77)},
        "unet": {"sample": (2 * b, 4, lat, lat), "encoder_hidden_states": (2 * b, 77, hidden)},
        "vae_decoder": {"latent_sample": (b, 4, lat, lat)},
        "vae_encoder": {"sample": (b, 3, cfg.trt_size, cfg.trt_size)},
    }[component]
    prof = {}
    for name, opt in shapes.items():
        if cfg.trt_static:
            prof[name] = (opt, opt, opt)
        else:
            lo = tuple(
                1 if i == 0 else (max(1, d // 2) if i >= 2 and len(opt) == 4 else d)
                for i, d in enumerate(opt)
            )
            hi = tuple(d * 2 if i == 0 or (i >= 2 and len(opt) == 4) else d for i, d in enumerate(opt))
            prof[name] = (lo, opt, hi)
    return prof


def build_engines(onnx_dir: Path, out_dir: Path, cfg: Any) -> dict[str, Any]:
    """Build one serialized engine per component with a shared timing cache."""
    trt = require_tensorrt()
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = out_dir / "timing.cache"
    report: dict[str, Any] = {"engines": {}, "static": cfg.trt_static, "refit": cfg.trt_refit}
    hidden = int(json.loads((onnx_dir / "unet" / "config.json").read_text()).get("cross_attention_dim", 768))
    for comp in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        onnx_path = onnx_dir / comp / "model.onnx"
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UserError(f"TensorRT could not parse {onnx_path}: {errs}")
        config = builder.create_builder_config()
        if cfg.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if cfg.trt_refit:
            config.set_flag(trt.BuilderFlag.REFIT)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        inputs = {network.get_input(i).name for i in range(network.num_inputs)}
        for name, (lo, opt, hi) in _profiles(comp, cfg, hidden).items():
            if name in inputs:
                profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise UserError(f"TensorRT failed to build the {comp} engine")
        (out_dir / f"{comp}.plan").write_bytes(bytes(engine))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        report["engines"][comp] = f"{comp}.plan"
    write_json(out_dir / "ort_tensorrt_provider.json", ort_trt_provider_options(out_dir, cfg, hidden))
    return report


def ort_trt_provider_options(cache_dir: Path, cfg: Any, hidden: int = 768) -> dict[str, Any]:
    """onnxruntime TensorRT execution-provider settings that load the same ONNX files."""
    lat = cfg.trt_size // 8
    b = 2 * cfg.trt_batch
    shape = f"sample:{b}x4x{lat}x{lat},encoder_hidden_states:{b}x77x{hidden}"
    return {
        "trt_fp16_enable": bool(cfg.fp16),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir / "ort_trt_cache"),
        "trt_timing_cache_enable": True,
        "trt_profile_min_shapes": shape,
        "trt_profile_opt_shapes": shape,
        "trt_profile_max_shapes": shape,
        "note": json.dumps({"unet_only_shapes": True}),
    }


class TrtEngine:
    """One deserialized engine with an execution context; tensors in and out are torch CUDA tensors.

    NOT RUN IN THIS WORKPLACE (no TensorRT, no GPU): follows TensorRT 10's documented name-based I/O
    (`set_input_shape`, `set_tensor_address`, `execute_async_v3`).
    """

    def __init__(self, plan: Path) -> None:
        trt = require_tensorrt()
        import torch

        self.torch = torch
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not load {plan}; rebuild it on this GPU/TensorRT version")
        self.context = self.engine.create_execution_context()
        self.trt = trt
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _torch_dtype(self, name: str) -> Any:
        torch, trt = self.torch, self.trt
        table = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.BOOL: torch.bool,
        }
        for attr, dt in (("INT64", torch.int64), ("BF16", torch.bfloat16), ("INT8", torch.int8)):
            if hasattr(trt.DataType, attr):
                table[getattr(trt.DataType, attr)] = dt
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, **feeds: Any) -> list[Any]:
        torch = self.torch
        stream = torch.cuda.current_stream()
        keep = []
        for name in self.inputs:
            # the engine's own dtype per tensor (e.g. int32 token ids if the parser narrowed them)
            x = feeds[name].to(device="cuda", dtype=self._torch_dtype(name)).contiguous()
            keep.append(x)
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            y = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self.context.set_tensor_address(name, y.data_ptr())
            outs.append(y)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return [o.float() for o in outs]
