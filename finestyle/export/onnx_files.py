"""ONNX step: the pipeline's components exported in optimum's layout, fp16 conversion with its VAE probe,
external data for graphs over 2 GB, file checks and the offline graph optimization.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finestyle.core.env import quiet_progress_bars
from finestyle.core.errors import VerificationError
from finestyle.core.onnxrt import ort_session
from finestyle.export.merge import release_memory
from finestyle.export.parity import FP16_IMAGE_ATOL

ONNX_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def quiet_export_warnings():
    import warnings

    ctx = warnings.catch_warnings()
    ctx.__enter__()
    # torch.jit tracer warnings about python control flow in diffusers blocks: expected, noisy.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    # The TorchScript exporter (dynamo=False) is chosen on purpose: it traces diffusers' UNet as
    # optimum does, and the project's parity checks prove its graphs.
    warnings.filterwarnings(
        "ignore",
        category=DeprecationWarning,
        message="You are using the legacy TorchScript-based ONNX export",
    )
    return ctx


def onnx_export(merged_dir: Path, onnx_dir: Path, fp16: bool, opset: int | None) -> dict[str, Any] | None:
    """optimum's exporter on the merged diffusers folder -> text_encoder/ unet/ vae_*/ model.onnx.

    The export itself is always fp32 (on any device). With `fp16`, the graphs are then converted to
    half precision with fp32 inputs and outputs (`to_fp16`); returns that conversion's report.
    """
    from optimum.exporters.onnx import main_export

    quiet_progress_bars()  # optimum loads the pipeline with diffusers' loading bars

    kw: dict[str, Any] = {}
    if opset:
        kw["opset"] = opset
    ctx = quiet_export_warnings()
    try:
        main_export(
            str(merged_dir),
            output=str(onnx_dir),
            task="text-to-image",
            library_name="diffusers",
            do_validation=False,
            **kw,
        )
    finally:
        ctx.__exit__(None, None, None)
    return to_fp16(onnx_dir) if fp16 else None


# protobuf cannot serialise a message over 2 GB: bigger models keep their weights in model.onnx_data
EXTERNAL_DATA_BYTES = 1_900_000_000


def _save_onnx(model: Any, path: Path) -> None:
    import onnx

    try:
        big = model.ByteSize() > EXTERNAL_DATA_BYTES
    except Exception:  # protobuf refuses to even size a message over 2 GB
        big = True
    for f in path.parent.glob("model.onnx*"):
        f.unlink()
    onnx.save(model, str(path), save_as_external_data=big, location="model.onnx_data" if big else None)


def to_fp16(
    onnx_dir: Path, components: tuple[str, ...] = ("text_encoder", "text_encoder_2", "unet", "unet_base")
) -> dict[str, Any]:
    """Convert graphs to fp16 keeping fp32 inputs/outputs; the VAE only if it is proven NaN-free.

    SD's VAE decoder is known to overflow in fp16 at real resolutions. The fp16 decoder is kept only
    if, on probe latents (a VAE-encoded probe image and scaled noise), it returns finite values within
    FP16_IMAGE_ATOL of the fp32 decoder; otherwise both VAE graphs stay fp32 (recorded).
    """
    import onnx

    rep: dict[str, Any] = {"converted": [], "keep_io_types": True}
    for comp in components:
        path = onnx_dir / comp / "model.onnx"
        if path.exists():
            m = _half(path)
            _save_onnx(m, path)
            del m
            release_memory()
            rep["converted"].append(comp)
    # VAE: convert candidates, probe, keep or drop
    dec32 = onnx_dir / "vae_decoder" / "model.onnx"
    enc32 = onnx_dir / "vae_encoder" / "model.onnx"
    cand = onnx_dir / "vae_decoder" / "model.fp16-candidate.onnx"
    onnx.save(_half(dec32), str(cand))
    probe = _vae_probe(enc32, dec32, cand)
    rep["vae_probe"] = probe
    if probe["ok"]:
        m = onnx.load(str(cand))
        cand.unlink()
        _save_onnx(m, dec32)
        _save_onnx(_half(enc32), enc32)
        rep["converted"] += ["vae_decoder", "vae_encoder"]
        rep["vae"] = "fp16"
    else:
        cand.unlink()
        rep["vae"] = "fp32"
    return rep


def _half(path: Path) -> Any:
    """fp16 weights and compute, fp32 inputs/outputs; re-sorted so onnx.checker accepts the graph
    (the converter appends its input casts at the end of the node list).

    Takes the file path: the converter then runs shape inference on the file, which works past
    protobuf's 2 GB limit (SD1.5's fp32 UNet is 3.4 GB); on an in-memory model it fails there."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    om = OnnxModel(convert_float_to_float16(str(path), keep_io_types=True))
    om.topological_sort()
    return om.model


def _vae_probe(enc32: Path, dec32: Path, dec16: Path) -> dict[str, Any]:
    cfg = json.loads((dec32.parent / "config.json").read_text())
    sf = float(cfg.get("scaling_factor", 0.18215))
    up = 2 ** (len(cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    size = 64 * up // 2 if up > 2 else 64
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([np.sin(6 * xx), np.cos(5 * yy), xx * yy * 2 - 1])[None].astype(np.float32)
    params = ort_session(enc32).run(None, {"sample": img})[0]  # latent_parameters: mean ++ logvar
    lat = params[:, : params.shape[1] // 2]  # the posterior mean: what the decoder takes (unscaled)
    probes = [lat, (g.standard_normal(lat.shape) / sf).astype(np.float32)]
    d32, d16 = ort_session(dec32), ort_session(dec16)
    worst, finite = 0.0, True
    for z in probes:
        a = d32.run(None, {"latent_sample": z})[0]
        b = d16.run(None, {"latent_sample": z})[0]
        finite &= bool(np.isfinite(b).all())
        if finite:
            worst = max(worst, float(np.abs(a - b).max()) / 2)  # decoder range [-1, 1] -> image [0, 1]
    return {
        "finite": finite,
        "max_abs_diff": worst,
        "atol": FP16_IMAGE_ATOL,
        "ok": finite and worst <= FP16_IMAGE_ATOL,
    }


def check_onnx_files(onnx_dir: Path) -> dict[str, str]:
    """onnx.checker (full check) on every model.onnx; path-based so external data works."""
    import onnx

    res = {}
    for comp in sorted(p.parent.name for p in onnx_dir.glob("*/model.onnx")):
        try:
            onnx.checker.check_model(str(onnx_dir / comp / "model.onnx"), full_check=True)
        except Exception as exc:  # noqa: BLE001
            raise VerificationError(f"onnx.checker rejected {comp}/model.onnx: {exc}") from exc
        res[comp] = "ok"
    return res


def optimize_unet(onnx_dir: Path, target: str) -> dict[str, Any]:
    """onnxruntime's diffusion graph optimizer on the UNet, with fusions that suit the target.

    On CPU the GPU-only fusions (NhwcConv, GroupNorm, BiasSplitGelu, ...) are turned off: they have no CPU kernels.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    path = onnx_dir / "unet" / "model.onnx"
    opts = FusionOptions("unet")
    if target == "cpu":
        for name in (
            "enable_nhwc_conv",
            "enable_group_norm",
            "enable_skip_group_norm",
            "enable_bias_splitgelu",
            "enable_packed_qkv",
            "enable_packed_kv",
            "enable_bias_add",
        ):
            if hasattr(opts, name):
                setattr(opts, name, False)
    model = optimize_model(
        str(path), model_type="unet", opt_level=0, optimization_options=opts, use_gpu=target != "cpu"
    )
    # The SD1.5 UNet (3.4 GB fp32) lives in external data: `path` itself is only the graph, so the
    # size that decides external data is the loaded model's. _save_onnx keeps optimum's
    # `model.onnx_data` name and removes the old data file.
    model.topological_sort()
    if any(n.domain == "com.microsoft" for n in model.model.graph.node) and not any(
        o.domain == "com.microsoft" for o in model.model.opset_import
    ):
        model.model.opset_import.add(domain="com.microsoft", version=1)
    _save_onnx(model.model, path)
    return {
        "target": target,
        "fused_ops": {k: v for k, v in model.get_fused_operator_statistics().items() if v},
    }
