"""TensorRT at inference: the engine backend and onnxruntime's TensorRT EP options.

Written against TensorRT 10's documented Python API; not yet run on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finestyle.core.errors import UserError
from finestyle.core.onnxrt import require_tensorrt


def ort_trt_provider_options(
    cache_dir: Path, cfg: Any, unet_shapes: dict[str, tuple[int, ...]]
) -> dict[str, Any]:
    """onnxruntime TensorRT execution-provider settings that load the same ONNX files; `unet_shapes`
    from `core.sd.unet_input_shapes` (SDXL adds text_embeds and time_ids)."""
    shape = ",".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in unet_shapes.items())
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

    Not yet run on a GPU: follows TensorRT 10's documented name-based I/O
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
