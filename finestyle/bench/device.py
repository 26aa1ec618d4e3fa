"""`finestyle bench export --device cuda`: one UNet step on a GPU in PyTorch and onnxruntime (CUDA and
TensorRT providers, IO-bound).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from finestyle.bench.common import np_dtype, sync_device, time_call_sync
from finestyle.core.models import (
    load_sd_pipeline,
    save_builtin,
)
from finestyle.core.sd import (
    pack_cond,
    pooled_dim,
    unet_kwargs,
)
from finestyle.export.steps import onnx_export


def bench_unet_step_device(
    model: str, latent: int = 64, batch: int = 2, iters: int = 10, device: str = "cuda", trt: bool = True
) -> dict[str, Any]:
    """One UNet step on an accelerator: PyTorch eager fp16 vs the fp16 ONNX export on onnxruntime's CUDA
    provider with IO binding (inputs and output stay on the device), and the TensorRT provider when
    onnxruntime has it (engine build time, step time, parity). On `device="cpu"` it runs the same
    steps in fp32 with the CPU provider (a dry run of the GPU path).

    Each half records its own status, so that a machine without onnxruntime-gpu still gets the PyTorch
    figures: `ort.status` / `trt.status` say "ran", or why not.
    """
    import importlib.util
    import tempfile

    from torch.utils.flop_counter import FlopCounterMode

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    res: dict[str, Any] = {
        "model": model,
        "latent": latent,
        "batch": batch,
        "device": str(dev),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    with tempfile.TemporaryDirectory() as d:
        src = save_builtin(model, Path(d) / "model") if model.startswith("builtin:") else Path(model)
        pipe = load_sd_pipeline(str(src), device=dev, dtype=dtype)
        unet = pipe.unet.eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, unet.config.in_channels, latent, latent, generator=g).to(dev)
        c = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
        pdim = pooled_dim(unet.config)
        if pdim:  # SDXL: the pooled embedding and the time ids too
            c = pack_cond(c, torch.randn(batch, pdim, generator=g))
        size = latent * pipe.vae_scale_factor
        kw = unet_kwargs(unet.config, c.to(dev), (size, size))
        cond = {"encoder_hidden_states": kw["encoder_hidden_states"], **kw.get("added_cond_kwargs", {})}
        cast = {k: v.to(dtype) for k, v in kw.items() if k == "encoder_hidden_states"}
        if "added_cond_kwargs" in kw:
            cast["added_cond_kwargs"] = {k: v.to(dtype) for k, v in kw["added_cond_kwargs"].items()}
        t = torch.tensor(500.0, device=dev)

        def eager() -> torch.Tensor:
            with torch.no_grad():
                return unet(x.to(dtype), t, **cast).sample.float()

        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ref = eager()
        res["gflop_per_step"] = fc.get_total_flops() / 1e9
        res["torch_eager_s"] = time_call_sync(eager, iters, dev)
        del pipe
        ort_reason = _ort_missing(cuda)
        if ort_reason or importlib.util.find_spec("optimum") is None:
            res["ort"] = {"status": f"skipped: {ort_reason or 'optimum is not installed'}"}
            res["trt"] = {"status": "skipped: needs the ONNX export (onnxruntime and optimum)"}
            return res
        import onnxruntime as ort

        onnx_export(src, Path(d) / "onnx", fp16=cuda, opset=None)
        path = Path(d) / "onnx" / "unet" / "model.onnx"
        provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
        res["ort"] = _ort_bound_step(ort, path, provider, x, cond, ref, iters, dev)
        res["ort_vs_torch"] = res["torch_eager_s"] / res["ort"]["step_s"]
        if not trt:
            res["trt"] = {"status": "skipped: not asked for"}
        elif "TensorrtExecutionProvider" not in ort.get_available_providers():
            res["trt"] = {"status": "skipped: onnxruntime has no TensorrtExecutionProvider here"}
        elif importlib.util.find_spec("tensorrt") is None:
            res["trt"] = {"status": "skipped: TensorRT is not installed (pip install 'finestyle[tensorrt]')"}
        else:
            try:
                res["trt"] = _ort_bound_step(ort, path, "TensorrtExecutionProvider", x, cond, ref, iters, dev)
                res["trt_vs_torch"] = res["torch_eager_s"] / res["trt"]["step_s"]
            except Exception as exc:  # noqa: BLE001 - recorded, the other figures stand
                res["trt"] = {"status": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
    return res


def _ort_missing(cuda: bool) -> str | None:
    """Why onnxruntime cannot run the device half here, or None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu, the gpu extra)"
    return None


def _ort_bound_step(
    ort: Any,
    path: Any,
    provider: str,
    x: torch.Tensor,
    cond: dict[str, torch.Tensor],
    ref: torch.Tensor,
    iters: int,
    dev: Any,
) -> dict[str, Any]:
    """Session creation (the engine build, for TensorRT), then the step with IO binding: the inputs are
    bound from the torch tensors' device memory and the output to a preallocated device tensor.
    `cond`: the UNet's conditioning inputs by ONNX name (SDXL: text_embeds and time_ids too)."""
    import numpy as np

    so = ort.SessionOptions()
    so.log_severity_level = 3
    t0 = time.perf_counter()
    sess = ort.InferenceSession(
        str(path), so, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"]))
    )
    kind, index = ("cuda", dev.index or 0) if dev.type == "cuda" else ("cpu", 0)
    inputs = {
        "sample": x.float().contiguous(),
        "timestep": torch.tensor(500.0, device=dev),
        **{k: v.float().contiguous() for k, v in cond.items()},
    }
    out = torch.empty(ref.shape, dtype=torch.float32, device=dev)
    io = sess.io_binding()
    for meta in sess.get_inputs():
        ten = inputs[meta.name]
        if meta.type == "tensor(int64)":
            ten = inputs[meta.name] = ten.long()
        io.bind_input(meta.name, kind, index, np_dtype(ten), list(ten.shape), ten.data_ptr())
    io.bind_output(sess.get_outputs()[0].name, kind, index, np.float32, list(out.shape), out.data_ptr())

    def step() -> None:
        sess.run_with_iobinding(io)

    step()
    sync_device(dev)
    build = time.perf_counter() - t0
    secs = time_call_sync(step, iters, dev)
    return {
        "status": "ran",
        "provider": sess.get_providers()[0],
        "session_and_first_run_s": build,
        "step_s": secs,
        "max_abs_diff_vs_torch": float((out - ref).abs().max()),
        "mean_abs_diff_vs_torch": float((out - ref).abs().mean()),
    }
