"""Inference runtime: one denoising loop over interchangeable backends (onnxruntime, torch).

FineStyle's control at inference (StyleDrop/FineStyle guidance):

    eps = eps_tuned(neg) + λ2·(eps_tuned(prompt) − eps_tuned(neg)) + λ1·(eps_tuned(prompt) − eps_base(prompt))

λ2 is the usual prompt guidance (`guidance`), λ1 the style guidance (`style_guidance`). λ1 > 0 costs
one more UNet pass per step (the base UNet on the prompt): `finestyle export --with-base-unet`
puts that UNet in the artifact; the torch backend can switch the adapter off instead.
Neutral settings (λ1 = 0) skip the extra pass and give exactly the plain CFG image.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finestyle import __version__
from finestyle.artifacts.adapter import ADAPTER_WEIGHTS, adapter_info
from finestyle.artifacts.manifest import export_layout, verify_export
from finestyle.config import SCHEDULERS, GenerateConfig, RequestOptions
from finestyle.core.errors import UserError
from finestyle.core.fs import hash_tree, sha256_file
from finestyle.core.models import load_sd_pipeline, quiet_hf_logs
from finestyle.core.onnxrt import ort_providers, ort_session, require_tensorrt
from finestyle.core.sd import (
    SD,
    SDXL,
    encode_texts,
    onnx_cond_feeds,
    pack_cond,
    pipe_family,
    sdxl_prompt_encoder,
    unet_kwargs,
)
from finestyle.runtime.openvino import backend_parts as openvino_parts
from finestyle.runtime.openvino import resolve_precision
from finestyle.runtime.tensorrt import TrtEngine

RUNTIMES = ("onnxruntime", "openvino", "torch", "tensorrt")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# What one generation asks for: config.RequestOptions, the one definition that `generate`'s options
# and the server's request bodies share.
GenerationRequest = RequestOptions


@dataclass
class Backend:
    """What the loop needs from a backend. Tensors in and out are CPU torch fp32."""

    name: str
    tokenizer: Any
    scheduler_config: dict[str, Any]
    scaling_factor: float
    vae_scale: int
    latent_channels: int
    native_size: int
    encode_text: Any  # (input_ids LongTensor) -> embeddings
    unet: Any  # (latents, t, emb) -> eps
    decode: Any  # (latents / scaling) -> images in [-1, 1]
    unet_base: Any | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    manifest_sha256: str | None = None
    parts: dict[str, Any] = field(default_factory=dict)  # the runtime's own objects (e.g. compiled models)
    # A swappable export: kv(emb, style names per row) -> K/V inputs, computed once per loop; `unet`
    # then takes those K/V in place of the embedding, and the base style serves style guidance.
    kv: Any | None = None
    styles: list[str] = field(default_factory=list)
    default_style: str | None = None
    reload: Any | None = None  # () -> styles: re-read a swappable export's styles (hot add/remove)
    family: str = SD
    # (texts, negative) -> conditioning rows; when set it replaces tokenizer + encode_text. SDXL
    # backends set it: two tokenizers, and the pooled embedding packed into the rows (core.sd).
    encode_prompts: Any | None = None


# ------------------------------------------------------------------------------------------------
# backends


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


def _trt_backend(export_dir: Path) -> Backend:
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


def _kv_feeds(lat: torch.Tensor, t: torch.Tensor, kvs: list[torch.Tensor]) -> dict[str, np.ndarray]:
    feeds = {"sample": lat.numpy().astype(np.float32), "timestep": np.array(float(t), dtype=np.float32)}
    feeds.update({f"kv_{i}": k.numpy().astype(np.float32) for i, k in enumerate(kvs)})
    return feeds


def _kv_parts_onnxruntime(
    export_dir: Path, manifest: dict[str, Any], dtype: str | None, layout: Any, precision: str | None = None
) -> dict[str, Any]:
    from finestyle.artifacts.styles import KV_UNET

    provs = ort_providers(None)
    te, vd, sess = (
        ort_session(export_dir / rel, provs)
        for rel in ("onnx/text_encoder/model.onnx", "onnx/vae_decoder/model.onnx", KV_UNET)
    )
    return {
        "name": f"onnxruntime[{provs[0]}]",
        "encode_text": lambda ids: torch.from_numpy(
            te.run(None, {"input_ids": ids.numpy().astype(np.int64)})[0].astype(np.float32)
        ),
        "decode": lambda z: torch.from_numpy(
            vd.run(None, {"latent_sample": z.numpy().astype(np.float32)})[0].astype(np.float32)
        ),
        "unet": lambda lat, t, kvs: torch.from_numpy(
            np.asarray(sess.run(None, _kv_feeds(lat, t, kvs))[0], dtype=np.float32)
        ),
    }


def _kv_parts_openvino(
    export_dir: Path, manifest: dict[str, Any], dtype: str | None, layout: Any, precision: str | None = None
) -> dict[str, Any]:
    """`precision` set: run at it without the export's recorded check (the export's own check)."""
    from finestyle.artifacts.styles import KV_UNET
    from finestyle.runtime.openvino import OvComponent, component_key, require_openvino

    prec = precision or resolve_precision(dtype, manifest)
    files = manifest.get("files") or hash_tree(export_dir, exclude=("manifest.json",))
    comp = OvComponent(
        require_openvino().Core(), export_dir / KV_UNET, prec, component_key(files, "unet_kv", prec)
    )
    parts = openvino_parts(export_dir / "onnx", files, prec, layout)
    comps = {**parts["components"], "unet_kv": comp}
    return {
        "name": f"openvino[CPU,{prec}]",
        "encode_text": parts["encode_text"],
        "decode": parts["decode"],
        "unet": lambda lat, t, kvs: torch.from_numpy(
            np.asarray(comp(**_kv_feeds(lat, t, kvs)), dtype=np.float32)
        ),
        "components": comps,
    }


def _kv_parts_tensorrt(
    export_dir: Path, manifest: dict[str, Any], dtype: str | None, layout: Any, precision: str | None = None
) -> dict[str, Any]:
    """The engines `export --swappable --format tensorrt` built; K/V are engine inputs, so every
    style runs on the same engines (not yet run on a GPU)."""
    if "tensorrt" not in manifest:
        raise UserError(
            f"{export_dir} has no TensorRT engines; export it with --swappable --format tensorrt, "
            "or use --runtime onnxruntime"
        )
    trt_dir = export_dir / "tensorrt"
    te, un, vd = (TrtEngine(trt_dir / f"{c}.plan") for c in ("text_encoder", "unet_kv", "vae_decoder"))

    def unet_fn(lat: torch.Tensor, t: torch.Tensor, kvs: list[torch.Tensor]) -> torch.Tensor:
        kv = {f"kv_{i}": k for i, k in enumerate(kvs)}
        return un(sample=lat, timestep=torch.tensor(float(t)), **kv)[0].cpu()

    return {
        "name": "tensorrt",
        "encode_text": lambda ids: te(input_ids=ids.to(torch.int64))[0].cpu(),
        "decode": lambda z: vd(latent_sample=z)[0].cpu(),
        "unet": unet_fn,
    }


_KV_PARTS = {
    "onnxruntime": _kv_parts_onnxruntime,
    "openvino": _kv_parts_openvino,
    "tensorrt": _kv_parts_tensorrt,
}


def _kv_unet_backend(
    export_dir: Path,
    runtime: str,
    manifest: dict[str, Any],
    msha: str | None,
    dtype: str | None,
    layers: list[str],
    precision: str | None = None,
) -> Backend:
    """The shared K/V UNet with the text encoder and VAE decoder of a swappable export, on one runtime;
    `unet(latents, t, kv)` takes the K/V list in place of the text embedding."""
    from finestyle.core.kv import KVUNet

    layout = sd_only(export_layout(export_dir / "onnx"), "a swappable export")
    if runtime == "torch":
        pipe = load_sd_pipeline(str(export_dir / "merged"), device="cpu", dtype=torch.float32)
        be = _torch_backend(pipe, manifest, msha, None, False)
        kv_unet = KVUNet(pipe.unet, layers).eval()

        @torch.no_grad()
        def unet_fn(lat: torch.Tensor, t: torch.Tensor, kvs: list[torch.Tensor]) -> torch.Tensor:
            return kv_unet(lat, t, *kvs).float()

        be.unet, be.unet_base = unet_fn, None
        return be
    parts = _KV_PARTS[runtime](export_dir, manifest, dtype, layout, precision)
    return Backend(
        name=parts["name"],
        **backend_layout(layout),
        encode_text=parts["encode_text"],
        unet=parts["unet"],
        decode=parts["decode"],
        manifest=manifest,
        manifest_sha256=msha,
        parts=parts.get("components") or {},
    )


def swappable_backend(
    export_dir: Path,
    runtime: str = "onnxruntime",
    manifest: dict[str, Any] | None = None,
    dtype: str | None = None,
    precision: str | None = None,
) -> Backend:
    """A style-swappable export: the shared K/V UNet on onnxruntime, openvino, torch or TensorRT, with every
    style's K/V computed from the text embedding once per denoising loop (`Backend.kv`). Without
    `manifest` the folder is verified first (the export's own checks pass theirs). `precision`: the
    export's own OpenVINO check runs at it, before the manifest records a check."""
    from finestyle.artifacts.styles import load_base_kv, load_style, style_names
    from finestyle.core.kv import project_kv

    export_dir = Path(export_dir)
    msha = None
    if manifest is None:
        manifest = verify_export(export_dir)
        msha = sha256_file(export_dir / "manifest.json")
    layers = manifest["swappable"]["layers"]
    base = load_base_kv(export_dir)
    names = style_names(manifest)
    cache: dict[str, Any] = {}
    cur = {"manifest": manifest}

    def style(name: str) -> Any:
        if name not in cache:
            cache[name] = load_style(export_dir, name, cur["manifest"])  # raises UserError naming the styles
        return cache[name]

    def kv(emb: torch.Tensor, row_styles: list[str]) -> list[torch.Tensor]:
        return project_kv(emb, layers, base, [style(n) for n in row_styles])

    for n in names:  # every style at load: a style made for another base is refused here
        style(n)

    be = _kv_unet_backend(export_dir, runtime, manifest, msha, dtype, layers, precision)

    def reload() -> list[str]:
        """Re-read the manifest: styles added or removed since start-up, each verified (hashes,
        base fingerprint) before it is served; the shared graph must be the one loaded."""
        from finestyle.artifacts.styles import verify_styles

        new = verify_export(export_dir, deep=False)
        if {k: v for k, v in new["files"].items() if not k.startswith("styles/")} != {
            k: v for k, v in cur["manifest"]["files"].items() if not k.startswith("styles/")
        }:
            raise UserError("the export's shared files changed since start-up; restart the server")
        verify_styles(export_dir, new)
        fresh = {n: load_style(export_dir, n, new) for n in style_names(new)}  # refuses a wrong base
        cur["manifest"] = new
        cache.clear()
        cache.update(fresh)
        be.manifest, be.styles = new, style_names(new)
        be.manifest_sha256 = sha256_file(export_dir / "manifest.json")
        return be.styles

    be.name = f"{be.name},swappable"
    be.kv, be.styles, be.reload = kv, names, reload
    be.default_style = manifest["swappable"].get("default") or (names[1] if len(names) > 1 else names[0])
    return be


def torch_backend_from_pipe(pipe: Any) -> Backend:
    """A torch backend over a pipeline already in memory (e.g. a merged model being checked)."""
    return _torch_backend(pipe, {}, None, None, False)


def torch_backend(model: str, adapter: str | None, device: str | None, dtype: str | None = None) -> Backend:

    path = Path(model)
    manifest, msha = {}, None
    base_for_style: str | None = None
    if (path / "manifest.json").exists():
        manifest = verify_export(path)
        msha = sha256_file(path / "manifest.json")
        pipe = load_sd_pipeline(str(path / "merged"), device=device, dtype=dtype)
        base_for_style = manifest.get("base_model")
    else:
        pipe = load_sd_pipeline(model, device=device, dtype=dtype)
    has_adapter = False
    if adapter:
        info = adapter_info(adapter)
        with quiet_hf_logs():
            pipe.load_lora_weights(
                adapter, weight_name=info.get("weight_name", ADAPTER_WEIGHTS), adapter_name="finestyle"
            )
        has_adapter = True
    return _torch_backend(pipe, manifest, msha, base_for_style, has_adapter)


def _torch_backend(
    pipe: Any, manifest: dict[str, Any], msha: str | None, base_for_style: str | None, has_adapter: bool
) -> Backend:
    dev, dt = pipe.unet.device, pipe.unet.dtype
    fmt = torch.contiguous_format
    if dev.type == "cpu" and dt == torch.bfloat16:
        # The CPU reduced-precision path: bf16 weights in channels_last let oneDNN use AMX/AVX512-BF16
        # convolutions; measured 3.4x an fp32 eager UNet step on SD 1.5 (README, bench export).
        fmt = torch.channels_last
        pipe.unet.to(memory_format=fmt)

    vae_scale = pipe.vae_scale_factor

    def cond_kw(unet: Any, lat: torch.Tensor, emb: torch.Tensor) -> dict[str, Any]:
        size_hw = (lat.shape[-2] * vae_scale, lat.shape[-1] * vae_scale)
        return unet_kwargs(unet.config, emb.to(dev, dt), size_hw)

    @torch.no_grad()
    def unet_fn(lat: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return (
            pipe.unet(
                lat.to(dev, dt).contiguous(memory_format=fmt), t.to(dev), **cond_kw(pipe.unet, lat, emb)
            )
            .sample.float()
            .cpu()
        )

    base_fn = None
    if has_adapter:

        @torch.no_grad()
        def base_fn(lat: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            pipe.disable_lora()  # the base model = the same UNet with the adapter switched off
            try:
                return unet_fn(lat, t, emb)
            finally:
                pipe.enable_lora()
    elif base_for_style:
        state: dict[str, Any] = {}

        @torch.no_grad()
        def base_fn(lat: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
            if "unet" not in state:  # loaded on first use: style guidance is opt-in
                state["unet"] = load_sd_pipeline(base_for_style, device=dev, dtype=dt).unet
            u = state["unet"]
            return u(lat.to(dev, dt), t.to(dev), **cond_kw(u, lat, emb)).sample.float().cpu()

    @torch.no_grad()
    def enc(ids: torch.Tensor) -> torch.Tensor:
        return pipe.text_encoder(ids.to(dev))[0].float().cpu()

    family = pipe_family(pipe)
    zero_negative = family == SDXL and bool(pipe.config.get("force_zeros_for_empty_prompt", False))

    @torch.no_grad()
    def enc_prompts(texts: list[str], negative: bool) -> torch.Tensor:
        hidden, pooled = encode_texts(pipe, texts, dev)
        cond = pack_cond(hidden, pooled).float().cpu()
        if negative and zero_negative:
            # SDXL pipelines use zeros, not the encoded "", for an empty negative prompt
            cond[[k for k, t in enumerate(texts) if not t]] = 0.0
        return cond

    @torch.no_grad()
    def dec(z: torch.Tensor) -> torch.Tensor:
        return pipe.vae.decode(z.to(dev, pipe.vae.dtype)).sample.float().cpu()

    return Backend(
        name=f"torch[{dev.type},{str(pipe.unet.dtype).removeprefix('torch.')}]",
        tokenizer=pipe.tokenizer,
        scheduler_config={**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__},
        scaling_factor=pipe.vae.config.scaling_factor,
        vae_scale=pipe.vae_scale_factor,
        latent_channels=pipe.unet.config.in_channels,
        native_size=pipe.unet.config.sample_size,
        encode_text=enc,
        unet=unet_fn,
        unet_base=base_fn,
        decode=dec,
        manifest=manifest,
        manifest_sha256=msha,
        family=family,
        encode_prompts=enc_prompts if family == SDXL else None,
    )


def load_backend(
    model: str,
    runtime: str = "auto",
    providers: list[str] | None = None,
    adapter: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Backend:
    """Pick and load a backend. An export folder defaults to onnxruntime; anything else to torch.

    `dtype`: fp32 | bf16 | fp16 | auto, for the torch runtime (bf16 on CPU is its fast
    reduced-precision path) and the openvino runtime (auto: bf16 where the CPU and the export's
    check allow it).
    """
    path = Path(model)
    is_export = (path / "manifest.json").exists() or (path / "onnx").is_dir()
    if runtime == "auto":
        runtime = "onnxruntime" if is_export and not adapter and dtype in (None, "auto", "fp32") else "torch"
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime {runtime!r}: use one of auto, {', '.join(RUNTIMES)}")
    if dtype not in (None, "auto", "fp32") and runtime not in ("torch", "openvino"):
        raise UserError(
            f"--dtype {dtype} applies to the torch and openvino runtimes; the ONNX export runs in "
            "onnxruntime at its own precision (fp32, or --fp16 at export)"
        )
    if is_export and (path / "manifest.json").exists() and not adapter:
        from finestyle.artifacts.styles import is_swappable

        m = verify_export(path)
        if is_swappable(m):
            if runtime not in ("onnxruntime", "openvino", "torch", "tensorrt"):
                raise UserError(
                    f"--runtime {runtime}: a swappable export runs on onnxruntime, openvino, torch or tensorrt"
                )
            return swappable_backend(path, runtime, dtype=dtype)
    if runtime == "openvino":
        if not is_export or adapter:
            raise UserError(
                f"--runtime openvino runs an export folder (manifest.json), not {model!r}"
                + (" with --adapter" if adapter else "")
                + "; run `finestyle export` first"
            )
        manifest = verify_export(path)
        return openvino_backend(path, resolve_precision(dtype, manifest))
    if runtime == "tensorrt":
        require_tensorrt()
        if not (path / "tensorrt").is_dir():
            raise UserError(
                f"{model!r} has no tensorrt/ engines; export with --format tensorrt, or use "
                "--runtime onnxruntime --providers TensorrtExecutionProvider"
            )
        return _trt_backend(path)
    if runtime == "onnxruntime":
        if not is_export:
            raise UserError(
                f"{model!r} is not an export folder (no manifest.json); run `finestyle export` or use "
                "--runtime torch"
            )
        return ort_backend(path, providers)
    return torch_backend(model, adapter, device, dtype)


# ------------------------------------------------------------------------------------------------
# the loop


def _scheduler(cfg: dict[str, Any], name: str | None = None) -> Any:
    """The model's scheduler, or the named SCHEDULERS entry configured from the model's config."""
    import diffusers

    if name is not None:
        if name not in SCHEDULERS:
            raise UserError(f"unknown scheduler {name!r}; use one of: {', '.join(SCHEDULERS)}")
        cls_name, extra = SCHEDULERS[name]
        return getattr(diffusers.schedulers, cls_name).from_config(cfg, **extra)
    cls_name = cfg.get("_class_name", "DDIMScheduler")
    cls = getattr(diffusers.schedulers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        raise UserError(f"unknown scheduler class {cls_name!r} in the model's scheduler_config.json")
    return cls.from_config(cfg)


def _encode(backend: Backend, texts: list[str], negative: bool = False) -> torch.Tensor:
    if backend.encode_prompts is not None:
        return backend.encode_prompts(texts, negative)
    tok = backend.tokenizer
    ids = tok(
        texts, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt"
    ).input_ids
    return backend.encode_text(ids)


def shape_key(req: GenerationRequest) -> tuple[Any, ...]:
    """Requests with the same key can share one batched denoising loop."""
    return (req.steps, req.guidance, req.style_guidance, req.width, req.height, req.scheduler)


def generate(backend: Backend, req: GenerationRequest) -> list[Any]:
    """Generate `num_images` PIL images for one prompt, following the guidance formula above."""
    return generate_batch(backend, [req])[0]


def request_styles(backend: Backend, reqs: list[GenerationRequest]) -> list[str]:
    """The style of every image row; a style named on a plain export is refused."""
    if backend.kv is None:
        named = [r.style for r in reqs if r.style]
        if named:
            raise UserError(
                f"style {named[0]!r}: this export has one style built in; naming styles needs a "
                "swappable export (`finestyle export --swappable`)"
            )
        return []
    out = []
    for r in reqs:
        name = r.style or backend.default_style
        if name not in backend.styles:
            raise UnknownStyle(name, backend.styles)
        out += [name] * r.num_images
    return out


class UnknownStyle(UserError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown style {name!r}; this export has: {', '.join(known)}")
        self.name, self.known = name, known


def generate_batch(backend: Backend, reqs: list[GenerationRequest]) -> list[list[Any]]:
    """One denoising loop for several requests that share `shape_key` (dynamic batching).

    Each request keeps its own prompt, negative prompt and seed: its initial latents come from its
    own generator, so batching does not change which image a seed gives.
    """
    from PIL import Image

    img = decoded_batch(backend, reqs)
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray(a) for a in arr]
    out, k = [], 0
    for r in reqs:
        out.append(images[k : k + r.num_images])
        k += r.num_images
    return out


def decoded_batch(backend: Backend, reqs: list[GenerationRequest]) -> torch.Tensor:
    """`generate_batch` before 8-bit rounding: the VAE's output in [-1, 1], one row per image."""
    r0 = reqs[0]
    if any(shape_key(r) != shape_key(r0) for r in reqs):
        raise ValueError("generate_batch: requests differ in steps/guidance/size")
    row_styles = request_styles(backend, reqs)
    if r0.style_guidance > 0 and backend.unet_base is None and backend.kv is None:
        raise UserError(
            "style guidance needs the base UNet: export with --with-base-unet, or use the torch "
            "runtime with --adapter"
        )
    size = backend.native_size * backend.vae_scale
    w, h = r0.width or size, r0.height or size
    counts = [r.num_images for r in reqs]
    # 1. text embeddings, one row per image: uncond rows then cond rows
    cond_u = _encode(backend, [r.prompt for r in reqs])
    neg_u = _encode(backend, [r.negative_prompt for r in reqs], negative=True)
    rep = torch.tensor(counts)
    cond = cond_u.repeat_interleave(rep, dim=0)
    neg = neg_u.repeat_interleave(rep, dim=0)
    do_cfg = r0.guidance > 1.0
    # 2. initial latents, per request from a CPU generator: same seed, same latents, any backend
    shape = (backend.latent_channels, h // backend.vae_scale, w // backend.vae_scale)
    # Each request's generator then also draws its images' noise in stochastic samplers (DDPM,
    # Euler-a): one generator per image row, so batching never changes which image a seed gives.
    gens = [torch.Generator().manual_seed(r.seed) for r in reqs]
    latents = torch.cat(
        [torch.randn((r.num_images, *shape), generator=g) for r, g in zip(reqs, gens, strict=True)]
    )
    row_gens = [g for r, g in zip(reqs, gens, strict=True) for _ in range(r.num_images)]
    sched = _scheduler(backend.scheduler_config, r0.scheduler)
    sched.set_timesteps(r0.steps)
    step_kw = {"generator": row_gens} if "generator" in inspect.signature(sched.step).parameters else {}
    latents = latents * sched.init_noise_sigma
    emb = torch.cat([neg, cond]) if do_cfg else cond
    base_in = cond
    if backend.kv is not None:
        # a swappable export: each row's K/V in its own style, once for the whole loop; style
        # guidance's base pass is the same UNet with the base style's K/V
        emb = backend.kv(emb, row_styles * 2 if do_cfg else row_styles)
        if r0.style_guidance > 0:
            base_in = backend.kv(cond, ["base"] * len(row_styles))
    unet_base = backend.unet if backend.kv is not None else backend.unet_base
    # 3. denoising loop
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
        eps = backend.unet(inp, t, emb)
        if do_cfg:
            e_neg, e_pos = eps.chunk(2)
            guided = e_neg + r0.guidance * (e_pos - e_neg)
        else:
            e_pos = guided = eps
        if r0.style_guidance > 0:
            e_base = unet_base(inp.chunk(2)[1] if do_cfg else inp, t, base_in)
            guided = guided + r0.style_guidance * (e_pos - e_base)
        latents = sched.step(guided, t, latents, **step_kw).prev_sample
    # 4. decode
    return backend.decode(latents / backend.scaling_factor)


def provenance(req: GenerationRequest, backend: Backend) -> dict[str, str]:
    """PNG text chunks: what made this image (the responsible-use minimum)."""
    return {
        "Software": f"FineStyle {__version__}",
        "finestyle:generated": "true",
        "finestyle:prompt": req.prompt,
        "finestyle:negative_prompt": req.negative_prompt,
        "finestyle:seed": str(req.seed),
        "finestyle:steps": str(req.steps),
        "finestyle:guidance": str(req.guidance),
        "finestyle:style_guidance": str(req.style_guidance),
        "finestyle:scheduler": req.scheduler or str(backend.scheduler_config.get("_class_name", "")),
        "finestyle:runtime": backend.name,
        "finestyle:manifest_sha256": backend.manifest_sha256 or "none",
        "finestyle:base_model": str(backend.manifest.get("base_model", "")),
        **({"finestyle:style": req.style or backend.default_style or ""} if backend.kv is not None else {}),
    }


def save_png(image: Any, path: Path, meta: dict[str, str]) -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in meta.items():
        info.add_itxt(k, v)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def negative_with_exclusions(negative: str, exclude: list[str]) -> str:
    parts = [p for p in [negative.strip(), *[e.strip() for e in exclude]] if p]
    return ", ".join(parts)


@dataclass
class GenerateResult:
    """What `generate` wrote: the PNG files, the runtime that made them and the wall time."""

    files: list[str]
    runtime: str
    seconds: float


def run_generate(cfg: GenerateConfig, log=_log) -> GenerateResult:
    """`finestyle generate`: load, generate, write PNGs with provenance."""
    t0 = time.perf_counter()
    backend = load_backend(cfg.model, cfg.runtime, cfg.providers, cfg.adapter, dtype=cfg.dtype)
    req = cfg.request(negative_with_exclusions(cfg.negative_prompt, cfg.exclude_concepts))
    images = generate(backend, req)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = []
    for k, im in enumerate(images):
        p = out if len(images) == 1 else out.with_name(f"{out.stem}-{k + 1}{out.suffix or '.png'}")
        meta = provenance(req, backend)
        meta["finestyle:index"] = str(k)
        save_png(im, p, meta)
        files.append(str(p))
    return GenerateResult(files=files, runtime=backend.name, seconds=time.perf_counter() - t0)


def export_concepts(export_dir: str | Path) -> dict[str, Any]:
    """The style and concept words the export's adapter learned (from its manifest); for a swappable
    export, each style's under `styles` (name -> style text and concepts)."""

    m = verify_export(export_dir, deep=False)
    styles = (m.get("swappable") or {}).get("styles")
    if styles is not None:
        per = {n: {"style": v.get("style"), "concepts": v.get("concepts", [])} for n, v in styles.items()}
        return {
            "style": None,
            "concepts": sorted({c for v in per.values() for c in v["concepts"]}),
            "styles": per,
        }
    return {"style": m.get("style"), "concepts": m.get("concepts", [])}
