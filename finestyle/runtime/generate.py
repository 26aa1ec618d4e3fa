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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finestyle import __version__
from finestyle.artifacts.manifest import verify_export
from finestyle.config import SCHEDULERS, GenerateConfig
from finestyle.core.errors import UserError
from finestyle.core.models import model_family
from finestyle.core.onnxrt import require_tensorrt
from finestyle.core.sd import MMDIT
from finestyle.core.text import phrase_in_window, window
from finestyle.runtime.auto import choose_runtime
from finestyle.runtime.backend import RUNTIMES, Backend, GenerationRequest, log_line
from finestyle.runtime.onnx_backends import (
    backend_layout,
    mmdit_backend,
    openvino_backend,
    ort_backend,
    provider_config,
    sd_only,
    trt_backend,
    trt_cache_dir,
)
from finestyle.runtime.openvino import resolve_precision
from finestyle.runtime.swappable import swappable_backend
from finestyle.runtime.torch_backend import (
    StyleGuided,
    mmdit_torch_backend,
    torch_backend,
    torch_backend_from_pipe,
)


def load_backend(
    model: str,
    runtime: str = "auto",
    providers: list[str] | None = None,
    adapter: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Backend:
    """Pick and load a backend. `auto` runs an export on the fastest path it verified for this machine
    (`finestyle.runtime.auto`: OpenVINO bf16/int8 on CPUs with those units, the GPU providers on a
    GPU, else onnxruntime fp32), and says why in the backend's name; anything else runs on torch.

    `dtype`: fp32 | bf16 | fp16 | auto, for the torch runtime (bf16 on CPU is its fast
    reduced-precision path) and the openvino runtime (auto: bf16 where the CPU and the export's
    check allow it). `auto` with `dtype` fp32 keeps to onnxruntime, the export's parity path.
    """
    path = Path(model)
    is_export = (path / "manifest.json").exists() or (path / "onnx").is_dir()
    if runtime == "auto" and is_export and not adapter and dtype in (None, "auto"):
        if (path / "manifest.json").exists():
            choice = choose_runtime(verify_export(path, deep=False))
            backend = load_backend(
                model, choice.runtime, providers or choice.providers, None, device, choice.dtype
            )
            backend.name = choice.label(backend.name)
            return backend
    if runtime == "auto" and dtype == "int8":
        runtime = "openvino"
    if runtime == "auto":
        runtime = "onnxruntime" if is_export and not adapter and dtype in (None, "auto", "fp32") else "torch"
    if dtype == "int8" and runtime != "openvino":
        raise UserError("--dtype int8 runs on --runtime openvino (an export quantized with --quantize int8)")
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
        if m.get("family") in MMDIT:
            if runtime == "torch":
                return mmdit_torch_backend(model, None, device, dtype)
            if runtime != "onnxruntime":
                raise UserError(
                    f"--runtime {runtime}: SD 3.x / FLUX.1 exports run on onnxruntime or torch so far "
                    "(docs/guides/sd3-flux.md)"
                )
            return mmdit_backend(path, providers, m)
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
        return trt_backend(path)
    if runtime == "onnxruntime":
        if not is_export:
            raise UserError(
                f"{model!r} is not an export folder (no manifest.json); run `finestyle export` or use "
                "--runtime torch"
            )
        return ort_backend(path, providers)
    if (
        is_export
        and dtype == "bf16"
        and ((verify_export(path, deep=False).get("cpu_bf16") or {}).get("pass") is False)
    ):
        raise UserError(
            "--runtime torch --dtype bf16: this export failed its bf16 image check (manifest.json, cpu_bf16); "
            "use --dtype fp32 or --runtime onnxruntime"
        )
    if not is_export and model_family(model) in MMDIT:
        return mmdit_torch_backend(model, adapter, device, dtype)
    return torch_backend(model, adapter, device, dtype)


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
        if name not in backend.styles and name not in backend.retired_styles:
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

    if backend.family in MMDIT:
        return [_mmdit_images(backend, r) for r in reqs]
    img = decoded_batch(backend, reqs)
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray(a) for a in arr]
    out, k = [], 0
    for r in reqs:
        out.append(images[k : k + r.num_images])
        k += r.num_images
    return out


def _mmdit_images(backend: Backend, req: GenerationRequest) -> list[Any]:
    """SD 3.x / FLUX.1: the ORT pipeline with λ2 as its guidance (SD 3: classifier-free guidance with
    the negative prompt; FLUX.1-dev: the distilled guidance input; schnell ignores it). Style guidance
    needs the base transformer, which these exports do not hold yet."""
    from finestyle.core.sd import SD3

    if req.style_guidance > 0 and not backend.parts.get("adapter"):
        raise UserError(
            "style guidance on SD 3.x / FLUX.1 needs the base transformer beside the adapter: run the base "
            "model with --adapter on the torch runtime (exports do not hold the base transformer yet)"
        )
    if req.scheduler:
        raise UserError(
            "SD 3.x / FLUX.1 exports sample with their own flow-matching scheduler; drop --scheduler"
        )
    pipe = backend.parts["pipe"]
    size = backend.native_size * backend.vae_scale
    kw: dict[str, Any] = dict(
        num_inference_steps=req.steps,
        guidance_scale=req.guidance,
        height=req.height or size,
        width=req.width or size,
        num_images_per_prompt=req.num_images,
        generator=torch.Generator().manual_seed(req.seed),
        output_type="pil",
    )
    if backend.family == SD3:
        kw["negative_prompt"] = req.negative_prompt or None
    if req.style_guidance > 0:
        cfg_scale = req.guidance if backend.family == SD3 and req.guidance > 1 else None
        with StyleGuided(pipe, req.style_guidance, cfg_scale):
            return list(pipe(req.prompt, **kw).images)
    return list(pipe(req.prompt, **kw).images)


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


def style_cut_warning(backend: Backend, req: GenerationRequest) -> str | None:
    """A one-line warning when the prompt names the export's style past the text encoder's window (the
    encoder cuts it, so the image would not get the style); None when the style words are read."""
    m = backend.manifest or {}
    styles = (m.get("swappable") or {}).get("styles") or {}
    style = (
        (styles.get(req.style or backend.default_style or "") or {}).get("style")
        if styles
        else m.get("style")
    )
    tok = backend.tokenizer
    if not style or tok is None or phrase_in_window([tok], req.prompt, style):
        return None
    return (
        f"the prompt's style words {style!r} lie past the text encoder's {window(tok)}-token window and are "
        "cut; put them earlier in the prompt or shorten it"
    )


def run_generate(cfg: GenerateConfig, log=log_line) -> GenerateResult:
    """`finestyle generate`: load, generate, write PNGs with provenance."""
    t0 = time.perf_counter()
    backend = load_backend(cfg.model, cfg.runtime, cfg.providers, cfg.adapter, dtype=cfg.dtype)
    req = cfg.request(negative_with_exclusions(cfg.negative_prompt, cfg.exclude_concepts))
    warning = style_cut_warning(backend, req)
    if warning:
        log(f"warning: {warning}")
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


__all__ = [
    "Backend",
    "GenerateResult",
    "GenerationRequest",
    "RUNTIMES",
    "UnknownStyle",
    "_encode",
    "log_line",
    "_scheduler",
    "trt_backend",
    "backend_layout",
    "decoded_batch",
    "export_concepts",
    "generate",
    "generate_batch",
    "load_backend",
    "style_cut_warning",
    "negative_with_exclusions",
    "openvino_backend",
    "ort_backend",
    "provenance",
    "provider_config",
    "request_styles",
    "run_generate",
    "save_png",
    "sd_only",
    "shape_key",
    "swappable_backend",
    "torch_backend",
    "torch_backend_from_pipe",
    "trt_cache_dir",
]
