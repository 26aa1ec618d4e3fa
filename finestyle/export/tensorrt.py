"""TensorRT engines from the exported ONNX files.

Not yet run on a GPU: the code follows TensorRT 10's documented Python API (Builder, OnnxParser,
optimization profiles, timing cache, REFIT flag) and imports TensorRT lazily; without it the export
exits 2 with one line, and the tests marked `tensorrt` skip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finestyle.artifacts.manifest import ONNX_COMPONENTS_SDXL
from finestyle.core.errors import UserError
from finestyle.core.fs import write_json
from finestyle.core.onnxrt import require_tensorrt
from finestyle.core.sd import unet_input_shapes
from finestyle.runtime.tensorrt import ort_trt_provider_options


def unet_shapes(onnx_dir: Path, cfg: Any) -> tuple[dict[str, tuple[int, ...]], int]:
    """The UNet's input shapes for the profile: 2 x trt_batch rows (guidance) at trt_size, which
    defaults to the model's native size; SDXL's text_embeds and time_ids included. Also returns the
    VAE's downsampling factor."""
    unet_cfg = json.loads((onnx_dir / "unet" / "config.json").read_text())
    vae_cfg = json.loads((onnx_dir / "vae_decoder" / "config.json").read_text())
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    size = cfg.trt_size or int(unet_cfg.get("sample_size", 64)) * vae_scale
    return unet_input_shapes(unet_cfg, vae_scale, size, 2 * cfg.trt_batch), vae_scale


def _profiles(
    component: str, cfg: Any, unet: dict[str, tuple[int, ...]], vae_scale: int
) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes per input. Static by default (min = opt = max), which runs faster."""
    b = cfg.trt_batch
    lat = unet["sample"][-2:]
    shapes = {
        "text_encoder": {"input_ids": (b * 2, 77)},
        "text_encoder_2": {"input_ids": (b * 2, 77)},
        "unet": unet,
        "vae_decoder": {"latent_sample": (b, unet["sample"][1], *lat)},
        "vae_encoder": {"sample": (b, 3, lat[0] * vae_scale, lat[1] * vae_scale)},
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
    unet, vae_scale = unet_shapes(onnx_dir, cfg)
    comps = [c for c in ONNX_COMPONENTS_SDXL if (onnx_dir / c / "model.onnx").is_file()]
    for comp in comps:
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
        for name, (lo, opt, hi) in _profiles(comp, cfg, unet, vae_scale).items():
            if name in inputs:
                profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise UserError(f"TensorRT failed to build the {comp} engine")
        (out_dir / f"{comp}.plan").write_bytes(bytes(engine))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        report["engines"][comp] = f"{comp}.plan"
    write_json(out_dir / "ort_tensorrt_provider.json", ort_trt_provider_options(out_dir, cfg, unet))
    return report
