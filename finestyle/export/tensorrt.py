"""TensorRT engines from the exported ONNX files.

Not yet run on a GPU: the code follows TensorRT 10's documented Python API (Builder, OnnxParser,
optimization profiles, timing cache, REFIT flag) and imports TensorRT lazily; without it the export
exits 2 with one line, and the tests marked `tensorrt` skip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finestyle.core.errors import UserError
from finestyle.core.fs import write_json
from finestyle.core.onnxrt import require_tensorrt
from finestyle.runtime.tensorrt import ort_trt_provider_options


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
