"""`finestyle bench export` on a CPU: one UNet step in PyTorch eager and bf16, onnxruntime and OpenVINO,
with the share of the measured matmul peak and where onnxruntime's time goes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from finestyle.artifacts.manifest import export_native_size
from finestyle.bench.common import matmul_peak, time_call
from finestyle.core.env import cpu_name
from finestyle.core.models import (
    load_sd_pipeline,
    save_builtin,
)
from finestyle.core.onnxrt import ort_providers, ort_session
from finestyle.export.steps import onnx_export


def _ort_op_times(onnx_path: Any, feeds: dict[str, Any], runs: int = 2) -> dict[str, float]:
    """Seconds per run by ONNX op type, from onnxruntime's own profiler (a separate session)."""
    import json as _json

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        so.profile_file_prefix = f"{d}/ort"
        sess = ort.InferenceSession(str(onnx_path), so, providers=ort_providers(["CPUExecutionProvider"]))
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = _json.loads(open(sess.end_profiling()).read())
    per: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            per[op] = per.get(op, 0.0) + e["dur"] / 1e6
    return {k: v / (runs + 1) for k, v in sorted(per.items(), key=lambda kv: -kv[1])}


def bench_unet_step(
    model: str,
    latent: int = 32,
    batch: int = 2,
    iters: int = 3,
    image_size: int | None = None,
    int8: bool = False,
) -> dict[str, Any]:
    """One UNet step: PyTorch eager fp32 vs onnxruntime fp32 (the export) vs bf16 candidates (and the
    NNCF int8 UNet on OpenVINO with `int8`)."""
    import tempfile

    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory() as d:
        src = save_builtin(model, Path(d) / "model") if model.startswith("builtin:") else Path(model)
        onnx_export(src, Path(d) / "onnx", fp16=False, opset=None)
        pipe = load_sd_pipeline(str(src), device="cpu")
        unet = pipe.unet.eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, unet.config.in_channels, latent, latent, generator=g)
        c = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
        t = torch.tensor(500)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ref = unet(x, t, encoder_hidden_states=c).sample
        gflop = fc.get_total_flops() / 1e9
        by_aten = {str(k): v / 1e9 for k, v in fc.get_flop_counts()["Global"].items()}

        def torch_fp32() -> None:
            with torch.no_grad():
                unet(x, t, encoder_hidden_states=c)

        sess = ort_session(Path(d) / "onnx" / "unet" / "model.onnx")
        feeds = {
            "sample": x.numpy(),
            "timestep": np.array(500, dtype=np.float32),
            "encoder_hidden_states": c.numpy(),
        }
        ort_out = sess.run(None, feeds)[0]

        def ort_fp32() -> None:
            sess.run(None, feeds)

        def torch_bf16_autocast() -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return unet(x, t, encoder_hidden_states=c).sample

        import copy

        unet16 = copy.deepcopy(unet).to(torch.bfloat16).to(memory_format=torch.channels_last)
        x16, c16 = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last), c.to(torch.bfloat16)

        def torch_bf16_weights() -> torch.Tensor:
            with torch.no_grad():
                return unet16(x16, t, encoder_hidden_states=c16).sample

        res: dict[str, Any] = {"model": model, "latent": latent, "batch": batch, "gflop_per_step": gflop}
        ov = _openvino_steps(Path(d), x, c, ref, int8)
        # interleave the measurements so machine noise hits both alike
        res["torch_fp32_s"] = time_call(torch_fp32, iters)
        res["ort_fp32_s"] = time_call(ort_fp32, iters)
        res["torch_bf16_autocast_s"] = time_call(torch_bf16_autocast, iters)
        res["torch_bf16_weights_s"] = time_call(torch_bf16_weights, iters)
        for prec, (fn, _) in ov.items():
            res[f"openvino_{prec}_s"] = time_call(fn, iters)
        res["torch_fp32_s_2"] = time_call(torch_fp32, iters)
        t_fp32 = (res["torch_fp32_s"] + res.pop("torch_fp32_s_2")) / 2
        res["torch_fp32_s"] = t_fp32
        res["ort_vs_torch"] = t_fp32 / res["ort_fp32_s"]
        res["bf16_vs_torch_fp32"] = t_fp32 / res["torch_bf16_autocast_s"]
        res["ort_max_abs_diff"] = float(np.abs(ort_out - ref.numpy()).max())
        bf = torch_bf16_autocast().float()
        res["bf16_rel_diff"] = float((bf - ref).abs().mean() / ref.abs().mean())
        res["bf16_weights_vs_torch_fp32"] = t_fp32 / res["torch_bf16_weights_s"]
        res["bf16_weights_rel_diff"] = float(
            (torch_bf16_weights().float() - ref).abs().mean() / ref.abs().mean()
        )
        res["openvino"] = "ran" if ov else "not installed"
        for prec, (_, rel) in ov.items():
            res[f"openvino_{prec}_rel_diff"] = rel
        native = export_native_size(Path(d)) or latent * 8
        res["whole_image"] = _whole_image(res, Path(d), src, image_size or native)
        res["ort_ops"] = _ort_op_times(Path(d) / "onnx" / "unet" / "model.onnx", feeds)
        if ov:  # the fastest float precision OpenVINO has here, by its own per-layer counters
            res["openvino_profiled"] = "bf16" if "bf16" in ov else "fp32"
            res["openvino_ops"] = _ov_op_times(
                Path(d) / "onnx" / "unet" / "model.onnx", res["openvino_profiled"], feeds
            )
    _add_peaks_and_breakdowns(res, by_aten, gflop)
    res["runtimes"] = runtime_table(res)
    return res


def _add_peaks_and_breakdowns(res: dict[str, Any], by_aten: dict[str, float], gflop: float) -> None:
    """This CPU's matmul peaks (bf16 only with bf16 units) and where each runtime's time goes."""
    from finestyle.runtime.openvino import hardware_precision

    # without bf16 units (AVX2) a 2048³ bf16 product runs a scalar fallback for minutes: no bf16 peak
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16) if hardware_precision() == "bf16" else None
    res["ort_breakdown"] = _ort_breakdown(res["ort_ops"], by_aten, gflop, peak32)
    if "openvino_ops" in res:
        peak = peak16 if res["openvino_profiled"] == "bf16" and peak16 else peak32
        res["openvino_breakdown"] = _ov_breakdown(res["openvino_ops"]["by_type"], by_aten, gflop, peak)
    res.update(
        matmul_fp32_gflops=peak32,
        matmul_bf16_gflops=peak16,
        ort_gflops=gflop / res["ort_fp32_s"],
        ort_share_of_fp32_peak=gflop / res["ort_fp32_s"] / peak32,
        cpu=cpu_name(),
    )


def _ov_op_times(onnx_path: Any, precision: str, feeds: dict[str, Any], runs: int = 2) -> dict[str, Any]:
    """Seconds per run by OpenVINO layer type from its own performance counters (a separate compile
    with PERF_COUNT), and the kernels the convolutions and matrix products ran on."""
    import numpy as np
    import openvino as ov

    from finestyle.runtime.openvino import OV_PRECISIONS

    core = ov.Core()
    m = core.read_model(str(onnx_path))
    m.reshape({k: list(np.shape(v)) for k, v in feeds.items()})
    cm = core.compile_model(
        m,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "PERF_COUNT": True,
        },
    )
    req = cm.create_infer_request()
    req.infer(feeds)  # first run: allocations, not counted
    by_type: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for _ in range(runs):
        req.infer(feeds)
        for p in req.profiling_info:
            if p.status.name == "EXECUTED":
                sec = p.real_time.total_seconds() / runs
                by_type[p.node_type] = by_type.get(p.node_type, 0.0) + sec
                if p.node_type in ("Convolution", "GroupConvolution", "MatMul", "FullyConnected"):
                    kernels[f"{p.node_type}: {p.exec_type}"] = (
                        kernels.get(f"{p.node_type}: {p.exec_type}", 0.0) + sec
                    )
    top = dict(sorted(by_type.items(), key=lambda kv: -kv[1])[:10])
    return {
        "by_type": by_type,
        "top10_ms": {k: v * 1e3 for k, v in top.items()},
        "kernels_ms": {k: v * 1e3 for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])},
        "total_ms": sum(by_type.values()) * 1e3,
    }


def _ov_breakdown(by_type: dict[str, float], by_aten: dict[str, float], gflop: float, peak: float) -> dict:
    """OpenVINO's layer types in `_ort_breakdown`'s terms: convolutions, matrix products, the rest."""
    mm = ("MatMul", "FullyConnected")
    ops = {
        "Conv": sum(v for k, v in by_type.items() if "Convolution" in k),
        "MatMul": sum(by_type.get(k, 0.0) for k in mm),
        **{k: v for k, v in by_type.items() if "Convolution" not in k and k not in mm},
    }
    return _ort_breakdown(ops, by_aten, gflop, peak)


def _ort_breakdown(ops: dict[str, float], by_aten: dict[str, float], gflop: float, peak32: float) -> dict:
    """Where a runtime's time goes (onnxruntime op types, or OpenVINO layer types mapped to Conv and
    MatMul), and the best the graph could do on this CPU: convolutions and matrix products at 100% of
    the matmul peak of its precision, every other op as measured."""
    conv_gflop = by_aten.get("aten.convolution", 0.0)
    mm_gflop = gflop - conv_gflop
    conv_s = ops.get("Conv", 0.0) + ops.get("FusedConv", 0.0)
    mm_s = sum(ops.get(k, 0.0) for k in ("MatMul", "Gemm", "FusedMatMul"))
    other_s = max(sum(ops.values()) - conv_s - mm_s, 0.0)
    return {
        "conv_gflop": conv_gflop,
        "conv_ms": conv_s * 1e3,
        "conv_share_of_peak": conv_gflop / conv_s / peak32 if conv_s else float("nan"),
        "matmul_gflop": mm_gflop,
        "matmul_ms": mm_s * 1e3,
        "matmul_share_of_peak": mm_gflop / mm_s / peak32 if mm_s else float("nan"),
        "other_ops_ms": other_s * 1e3,
        "ceiling_share_of_peak": gflop / (gflop / peak32 + other_s) / peak32,
    }


CPU_RUNTIMES = (
    # (label, timing key, precision of its arithmetic, relative-difference key)
    ("PyTorch eager fp32", "torch_fp32_s", "fp32", None),
    ("PyTorch bf16 + channels_last (CPU fast path)", "torch_bf16_weights_s", "bf16", "bf16_weights_rel_diff"),
    ("onnxruntime fp32 (the export)", "ort_fp32_s", "fp32", None),
    ("OpenVINO fp32 (the same ONNX)", "openvino_fp32_s", "fp32", "openvino_fp32_rel_diff"),
    ("OpenVINO bf16 (the same ONNX)", "openvino_bf16_s", "bf16", "openvino_bf16_rel_diff"),
    ("OpenVINO int8 hybrid (NNCF, the default)", "openvino_int8_s", "int8", "openvino_int8_rel_diff"),
    ("OpenVINO int8 full (NNCF)", "openvino_int8-full_s", "int8", "openvino_int8-full_rel_diff"),
)


def runtime_table(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per CPU runtime: ms per step, speed against eager fp32, GFLOP/s and the share of the
    matmul peak of its own precision."""
    rows = []
    for label, key, prec, rel in CPU_RUNTIMES:
        if key not in res:
            continue
        sec = res[key]
        gflops = res["gflop_per_step"] / sec
        # None: no bf16 units, or no int8 peak measured
        peak = res.get(
            {"bf16": "matmul_bf16_gflops", "int8": "matmul_int8_gops"}.get(prec, "matmul_fp32_gflops")
        )
        rows.append(
            {
                "runtime": label,
                "key": key,
                "ms": sec * 1e3,
                "vs_eager_fp32": res["torch_fp32_s"] / sec,
                "gflops": gflops,
                "precision": prec,
                "share_of_peak": gflops / peak if peak else None,
                "rel_diff": res.get(rel) if rel else None,
            }
        )
    return rows


def _openvino_steps(
    onnx_root: Any, x: torch.Tensor, c: torch.Tensor, ref: torch.Tensor, int8: bool = False
) -> dict[str, Any]:
    """OpenVINO UNet step callables (fp32, bf16 where the CPU has bf16, and with `int8` the UNet that
    `export --quantize int8` makes, calibrated here on the step's inputs at five noise levels) over
    the exported ONNX, each with its mean relative difference to eager fp32; {} without OpenVINO.
    Compiled blobs go to a folder of the run, so the benchmark leaves no cache behind."""
    import os

    import numpy as np

    try:
        import openvino as ov
    except ImportError:
        return {}
    from finestyle.runtime.openvino import OvComponent, hardware_precision

    os.environ["FINESTYLE_OV_CACHE"] = str(onnx_root / "ov-cache")
    core = ov.Core()
    feeds = {"sample": x.numpy(), "timestep": np.array(500.0, np.float32), "encoder_hidden_states": c.numpy()}
    out = {}
    if int8:
        from finestyle.export.quantize import quantize_unet
        from finestyle.runtime.openvino import INT8_UNET

        g = torch.Generator().manual_seed(1)
        calib = [
            {
                **feeds,
                "sample": torch.randn(x.shape, generator=g).numpy(),
                "timestep": np.array(t, np.float32),
            }
            for t in (999.0, 750.0, 500.0, 250.0, 1.0)
        ]
        for mode in ("hybrid", "full"):
            target = INT8_UNET if mode == "hybrid" else INT8_UNET.replace("unet_int8", "unet_int8_full")
            quantize_unet(onnx_root / "onnx" / "unet" / "model.onnx", calib, onnx_root / target, mode)
    precs = ("fp32", hardware_precision(), "int8", "int8-full") if int8 else ("fp32", hardware_precision())
    for prec in dict.fromkeys(precs):
        graph = onnx_root / "onnx/unet/model.onnx"
        if prec.startswith("int8"):
            graph = onnx_root / (
                "openvino/unet_int8/model.xml" if prec == "int8" else "openvino/unet_int8_full/model.xml"
            )
        comp = OvComponent(core, graph, prec.split("-")[0], f"bench-{prec}")
        got = torch.from_numpy(comp(**feeds))
        rel = float((got - ref).abs().mean() / ref.abs().mean())
        out[prec] = ((lambda comp=comp: comp(**feeds)), rel)
    return out


def _whole_image(res: dict[str, Any], root: Any, src: Any, size: int) -> dict[str, Any]:
    """Text encoder + 20 steps (with guidance) + VAE decode at `size` px (the model's native size by
    default): on the path `--runtime auto` picks on this machine, beside onnxruntime fp32 (the
    export's parity path), so the default's gain is a figure. The bench's UNet-level OpenVINO
    difference stands in for the export's image check (within the same 0.02 tolerance)."""
    from finestyle.runtime.auto import choose_runtime
    from finestyle.runtime.generate import GenerationRequest, generate, openvino_backend, ort_backend
    from finestyle.runtime.openvino import OV_IMAGE_MEAN_ATOL

    checks = {}
    if "openvino_bf16_rel_diff" in res:
        diff = res["openvino_bf16_rel_diff"]
        checks["bf16"] = {"pass": diff <= OV_IMAGE_MEAN_ATOL, "mean_abs_diff": diff}
    choice = choose_runtime({"openvino": {"checks": checks}})
    loaders = {"ort_fp32": lambda: ort_backend(root, ["CPUExecutionProvider"], manifest={})}
    if choice.runtime == "openvino":
        loaders["auto"] = lambda: openvino_backend(root, choice.dtype, manifest={}, files={})
    req = GenerationRequest("a lighthouse on a cliff at night", steps=20, width=size, height=size)
    seconds, names = {}, {}
    for key, load in loaders.items():
        be = load()
        generate(
            be, GenerationRequest(req.prompt, steps=1, width=req.width, height=req.height)
        )  # compile/warm
        t = time.perf_counter()
        generate(be, req)
        seconds[key], names[key] = time.perf_counter() - t, be.name
    auto = "auto" if "auto" in seconds else "ort_fp32"
    return {
        "runtime": choice.label(names[auto]),
        "size": size,
        "steps": 20,
        "seconds": seconds[auto],
        "ort_fp32_seconds": seconds["ort_fp32"],
        "auto_vs_ort_fp32": seconds["ort_fp32"] / seconds[auto],
    }
