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
    return {name: _range(opt, cfg.trt_static) for name, opt in shapes.items()}


def _range(opt: tuple[int, ...], static: bool) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) of one input: opt thrice when static; else batch 1..2x and, for image-like
    (4-d) inputs, height and width from half to twice."""
    if static:
        return (opt, opt, opt)
    lo = tuple(
        1 if i == 0 else (max(1, d // 2) if i >= 2 and len(opt) == 4 else d) for i, d in enumerate(opt)
    )
    hi = tuple(d * 2 if i == 0 or (i >= 2 and len(opt) == 4) else d for i, d in enumerate(opt))
    return (lo, opt, hi)


def graph_inputs(onnx_path: Path) -> dict[str, list[int | str]]:
    """Each graph input's dims: an int where static, its symbolic name where dynamic (the weights,
    which may be external data, are not read)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        out[inp.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return out


def kv_unet_profile(onnx_path: Path, sample: tuple[int, ...], tokens: int = 77) -> dict[str, tuple[int, ...]]:
    """Engine input shapes of a swappable export's K/V UNet: the latents as `sample`, a scalar
    timestep, and each K/V input as (batch, tokens, its width from the graph)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in graph_inputs(onnx_path).items():
        if name == "sample":
            shapes[name] = tuple(sample)
        elif name == "timestep":
            shapes[name] = tuple(d if isinstance(d, int) else 1 for d in dims)
        elif name.startswith("kv_"):
            if len(dims) != 3 or not isinstance(dims[2], int):
                raise UserError(
                    f"{onnx_path}: input {name} has shape {dims}; expected (batch, tokens, width)"
                )
            shapes[name] = (sample[0], tokens, dims[2])
        else:
            raise UserError(f"{onnx_path}: unexpected input {name!r} for a K/V UNet")
    return shapes


def _build_engine(
    trt: Any, logger: Any, onnx_path: Path, profile_shapes: dict[str, Any], cfg: Any, cache_path: Path
) -> bytes:
    """One serialized engine from one ONNX file, with a shared timing cache (written back)."""
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
    for name, (lo, opt, hi) in profile_shapes.items():
        if name in inputs:
            profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path}")
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(engine)


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
        prof = _profiles(comp, cfg, unet, vae_scale)
        plan = _build_engine(trt, logger, onnx_dir / comp / "model.onnx", prof, cfg, cache_path)
        (out_dir / f"{comp}.plan").write_bytes(plan)
        report["engines"][comp] = f"{comp}.plan"
    write_json(out_dir / "ort_tensorrt_provider.json", ort_trt_provider_options(out_dir, cfg, unet))
    return report


def build_swappable_engines(onnx_dir: Path, out_dir: Path, cfg: Any) -> dict[str, Any]:
    """Engines of a swappable export: text encoder, VAE decoder and the shared K/V UNet, whose K/V
    are engine inputs, so adding a style never rebuilds or refits an engine. Static shapes at
    `trt_batch` images (2x rows for guidance) of `trt_size` px (default: the model's native size),
    static unless `trt_static` is off. Not yet run on a GPU."""
    trt = require_tensorrt()
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = out_dir / "timing.cache"
    unet, vae_scale = unet_shapes(onnx_dir, cfg)
    report: dict[str, Any] = {"engines": {}, "static": cfg.trt_static, "refit": False, "kv_inputs": True}
    profiles = {
        "text_encoder": _profiles("text_encoder", cfg, unet, vae_scale),
        "vae_decoder": _profiles("vae_decoder", cfg, unet, vae_scale),
        "unet_kv": {
            k: (v, v, v)
            for k, v in kv_unet_profile(onnx_dir / "unet_kv" / "model.onnx", unet["sample"]).items()
        },
    }
    for comp, prof in profiles.items():
        plan = _build_engine(trt, logger, onnx_dir / comp / "model.onnx", prof, cfg, cache_path)
        (out_dir / f"{comp}.plan").write_bytes(plan)
        report["engines"][comp] = f"{comp}.plan"
    return report
