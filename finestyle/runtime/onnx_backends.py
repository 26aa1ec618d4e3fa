"""Backends on an ONNX export: onnxruntime (CPU, CUDA, TensorRT providers, with their engine cache),
TensorRT engines and OpenVINO.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finestyle.artifacts.manifest import export_layout, verify_export
from finestyle.core.errors import UserError
from finestyle.core.fs import sha256_file
from finestyle.core.onnxrt import ort_providers
from finestyle.core.sd import (
    SD,
    SDXL,
    onnx_cond_feeds,
    sdxl_prompt_encoder,
)
from finestyle.runtime.backend import Backend
from finestyle.runtime.openvino import backend_parts as openvino_parts
from finestyle.runtime.tensorrt import TrtEngine


def trt_cache_dir(export_dir: Path, manifest_sha: str) -> Path:
    """Where onnxruntime's TensorRT EP keeps engines and timing caches for one export: outside the
    (hashed, read-only) export folder, keyed by its manifest so a new export never reuses stale
    engines. FINESTYLE_TRT_CACHE overrides the root (default ~/.cache/finestyle/ort-trt)."""
    import os

    root = os.environ.get("FINESTYLE_TRT_CACHE") or Path.home() / ".cache" / "finestyle" / "ort-trt"
    return Path(root) / manifest_sha[:16]


def provider_config(providers: list[str], comp: str, export_dir: Path, manifest: dict[str, Any]) -> list[Any]:
    """onnxruntime providers for one component, with TensorRT EP options when it is in the list.

    Without options the TensorRT EP rebuilds every engine at each start (minutes for a UNet); with
    them engines and timing caches persist per export and component, fp16 kernels follow the
    export's precision, and the UNet gets the shape profile `--format tensorrt` wrote (if any).
    NOT RUN HERE (no GPU/TensorRT): option names follow onnxruntime's TensorRT EP documentation.
    """
    out: list[Any] = []
    for p in providers:
        if p != "TensorrtExecutionProvider":
            out.append(p)
            continue
        cache = trt_cache_dir(export_dir, sha256_file(export_dir / "manifest.json")) / comp
        opts: dict[str, Any] = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            "trt_fp16_enable": manifest.get("precision") == "fp16",
        }
        saved = export_dir / "tensorrt" / "ort_tensorrt_provider.json"
        if comp in ("unet", "unet_base") and saved.exists():
            prof = json.loads(saved.read_text())
            for k in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
                if k in prof:
                    opts[k] = prof[k]
        out.append((p, opts))
    return out


def ort_backend(
    export_dir: Path,
    providers: list[str] | None,
    io_binding: bool | None = None,
    manifest: dict[str, Any] | None = None,
) -> Backend:
    """onnxruntime sessions for an export. `io_binding` (default: on for CUDA/TensorRT providers)
    binds inputs and outputs on the providers' device; the same code path runs on the CPU device
    in the tests. Without `manifest` the folder is verified first (the benchmarks pass {} for a
    bare ONNX folder)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise UserError(
            "the onnxruntime runtime needs onnxruntime: pip install 'finestyle[cpu]' (or [gpu])"
        ) from exc

    verified = manifest is None
    manifest = verify_export(export_dir) if manifest is None else manifest
    onnx_dir = export_dir / "onnx"
    provs = ort_providers(providers)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # No busy-waiting between runs: a server's event loop, HTTP and PNG work share these cores
    # with inference (onnxruntime's default spins its pool threads after every run).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def sess(comp: str) -> Any:
        return ort.InferenceSession(
            str(onnx_dir / comp / "model.onnx"),
            sess_options=so,
            providers=provider_config(provs, comp, export_dir, manifest),
        )

    te, un, vd = sess("text_encoder"), sess("unet"), sess("vae_decoder")
    ub = sess("unet_base") if (onnx_dir / "unet_base" / "model.onnx").exists() else None
    half = any(i.type == "tensor(float16)" for i in un.get_inputs())
    fdt = np.float16 if half else np.float32

    on_cuda = provs[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    bind = on_cuda if io_binding is None else io_binding
    dev = "cuda" if on_cuda else "cpu"

    layout = export_layout(onnx_dir)
    unet_cfg, vae_scale = layout["unet_config"], layout["vae_scale"]

    def unet_call(s: Any) -> Any:
        out_name = s.get_outputs()[0].name
        held: dict[str, Any] = {}  # the conditioning of the current loop, already on the device

        def run(lat: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            feeds = {
                "sample": lat.numpy().astype(fdt),
                "timestep": np.array(float(t), dtype=np.float32),
            }
            size_hw = (lat.shape[-2] * vae_scale, lat.shape[-1] * vae_scale)
            if not bind:
                cond = onnx_cond_feeds(unet_cfg, emb, size_hw)
                feeds |= _cast_cond(s, cond, fdt)
                return torch.from_numpy(s.run(None, feeds)[0].astype(np.float32))
            # IO binding: the latents and timestep go to the device once per call, the conditioning
            # once per denoising loop (the same tensor object every step; holding it keeps the
            # identity check sound), the output is allocated on the device by onnxruntime and read
            # back once. The tests run it on the CPU device; on CUDA it is not yet run on a GPU.
            held_now = held.get("cond")  # (tensor, size, OrtValues), read once: safe across threads
            if held_now is None or held_now[0] is not emb or held_now[1] != size_hw:
                cond = _cast_cond(s, onnx_cond_feeds(unet_cfg, emb, size_hw), fdt)
                values = {k: ort.OrtValue.ortvalue_from_numpy(v, dev, 0) for k, v in cond.items()}
                held_now = (emb, size_hw, values)
                held["cond"] = held_now
            binding = s.io_binding()
            for name, arr in feeds.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, dev, 0))
            for name, value in held_now[2].items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output(out_name, dev)
            s.run_with_iobinding(binding)
            return torch.from_numpy(binding.copy_outputs_to_cpu()[0].astype(np.float32))

        return run

    te2 = sess("text_encoder_2") if layout["family"] == SDXL else None
    return Backend(
        name=f"onnxruntime[{provs[0]}]",
        **backend_layout(layout),
        encode_text=lambda ids: torch.from_numpy(
            te.run(None, {"input_ids": ids.numpy().astype(np.int64)})[0].astype(np.float32)
        ),
        encode_prompts=None if te2 is None else _ort_sdxl_encoder(layout, te, te2),
        unet=unet_call(un),
        unet_base=unet_call(ub) if ub is not None else None,
        decode=lambda z: torch.from_numpy(
            vd.run(None, {"latent_sample": z.numpy().astype(fdt)})[0].astype(np.float32)
        ),
        manifest=manifest,
        manifest_sha256=sha256_file(export_dir / "manifest.json") if verified else None,
    )


def _cast_cond(sess: Any, cond: dict[str, np.ndarray], fdt: Any) -> dict[str, np.ndarray]:
    """Conditioning feeds in the graph's float type (time_ids and text_embeds follow it too)."""
    types = {i.name: i.type for i in sess.get_inputs()}
    return {
        k: v.astype(np.float16 if types.get(k) == "tensor(float16)" else np.float32) for k, v in cond.items()
    }


def sd_only(layout: dict[str, Any], what: str) -> dict[str, Any]:
    """Refuse an SDXL export on a path that is built for SD 1.x/2.x only."""
    if layout["family"] != SD:
        raise UserError(f"{what} does not run SDXL exports yet; use --runtime onnxruntime or --runtime torch")
    return layout


def backend_layout(layout: dict[str, Any]) -> dict[str, Any]:
    """The Backend fields of an `export_layout` (the rest, e.g. configs, stays with the caller)."""
    keys = (
        "tokenizer",
        "scheduler_config",
        "scaling_factor",
        "vae_scale",
        "latent_channels",
        "native_size",
        "family",
    )
    return {k: layout[k] for k in keys}


def _ort_sdxl_encoder(layout: dict[str, Any], te: Any, te2: Any) -> Any:
    """SDXL's packed prompt conditioning from the two ONNX text encoders in onnxruntime."""

    def runner(sess: Any) -> tuple[Any, list[str]]:
        return (lambda ids, names: sess.run(names, {"input_ids": ids})), [o.name for o in sess.get_outputs()]

    return sdxl_prompt_encoder(
        [layout["tokenizer"], layout["tokenizer_2"]],
        [runner(te), runner(te2)],
        bool(layout["force_zeros_for_empty_prompt"]),
    )


def trt_backend(export_dir: Path) -> Backend:
    """TensorRT engines from `tensorrt/` (not yet run on a GPU)."""
    import torch

    manifest = verify_export(export_dir)
    trt_dir, onnx_dir = export_dir / "tensorrt", export_dir / "onnx"
    te, un, vd = (TrtEngine(trt_dir / f"{c}.plan") for c in ("text_encoder", "unet", "vae_decoder"))

    def unet_fn(lat: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return un(sample=lat, timestep=torch.tensor(float(t)), encoder_hidden_states=emb)[0].cpu()

    return Backend(
        name="tensorrt",
        **backend_layout(sd_only(export_layout(onnx_dir), "--runtime tensorrt")),
        encode_text=lambda ids: te(input_ids=ids.to(torch.int64))[0].cpu(),
        unet=unet_fn,
        decode=lambda z: vd(latent_sample=z)[0].cpu(),
        manifest=manifest,
        manifest_sha256=sha256_file(export_dir / "manifest.json"),
    )


def openvino_backend(
    export_dir: Path,
    precision: str,
    manifest: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> Backend:
    """OpenVINO over the export's ONNX files at `precision` (fp32 | bf16 | fp16). Without
    `manifest` the folder is verified first; the export's own check passes both (it runs before the
    manifest exists)."""
    msha = None
    if manifest is None:
        manifest = verify_export(export_dir)
        msha = sha256_file(export_dir / "manifest.json")
    layout = export_layout(export_dir / "onnx")
    parts = openvino_parts(
        export_dir / "onnx", manifest["files"] if files is None else files, precision, layout
    )
    comps = parts.pop("components")
    return Backend(
        name=f"openvino[CPU,{precision}]",
        **backend_layout(layout),
        **parts,
        manifest=manifest,
        manifest_sha256=msha,
        parts=comps,
    )


def mmdit_backend(export_dir: Path, providers: list[str] | None, manifest: dict[str, Any]) -> Backend:
    """An SD 3.x / FLUX.1 export on onnxruntime, through optimum's ORT pipelines (the pipeline its
    export's image parity was measured with). `generate_batch` runs it request by request."""
    from optimum.onnxruntime import ORTFluxPipeline, ORTStableDiffusion3Pipeline

    from finestyle.core.sd import SD3

    family = manifest["family"]
    cls = ORTStableDiffusion3Pipeline if family == SD3 else ORTFluxPipeline
    provs = ort_providers(providers)
    pipe = cls.from_pretrained(str(export_dir / "onnx"), provider=provs[0])
    pipe.set_progress_bar_config(disable=True)
    vae_scale = int(pipe.vae_scale_factor)
    native = int(getattr(pipe, "default_sample_size", 128))
    return Backend(
        name=f"onnxruntime ({provs[0]}, optimum {cls.__name__})",
        tokenizer=pipe.tokenizer,
        scheduler_config=dict(pipe.scheduler.config),
        scaling_factor=float(pipe.vae_decoder.config.get("scaling_factor", 1.0)),
        vae_scale=vae_scale,
        latent_channels=int(pipe.vae_decoder.config.get("latent_channels", 16)),
        native_size=native,
        encode_text=None,
        unet=None,
        decode=None,
        manifest=manifest,
        manifest_sha256=sha256_file(export_dir / "manifest.json"),
        parts={"pipe": pipe},
        family=family,
    )
