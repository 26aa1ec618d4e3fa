"""`finestyle bench stages`: each stage's time and peak memory, each in its own process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from finestyle.bench.common import bench_images, run_worker
from finestyle.config import PrepareConfig, TrainConfig
from finestyle.core.env import cpu_name
from finestyle.core.models import (
    is_builtin,
    model_family,
    save_builtin,
)
from finestyle.core.sd import (
    SDXL,
)
from finestyle.prepare.stage import run_prepare
from finestyle.train.loop import (
    run_train,
)


def stage_worker(stage: str, base: str, work: str, resolution: int, steps: int) -> dict[str, Any]:
    """One stage in its own process, so that its peak RSS is its own.

    - `prepare`: attention concepts located by `base` on two example images (tiny BLIP captions).
    - `train`: `steps` cached bf16 training steps at `resolution` (latents and text cached first).
    - `export-parts`: optimum's ONNX export of the text encoder(s) and the VAE, read from `base`
      saved as a folder: every component of an export but the UNet.
    - `save`: build a builtin and write it as that folder.
    """
    import resource

    t0 = time.perf_counter()
    if stage == "save":
        save_builtin(base, f"{work}/model")
    elif stage == "prepare":
        run_prepare(
            PrepareConfig(
                images=[str(p) for p in sorted(Path(f"{work}/images").iterdir())[:2]],
                style="paper-cut",
                out=f"{work}/ds-attention",
                base=base,
                concepts="attention",
                max_concepts=2,
                num_beams=1,
            ),
            log=lambda m: None,
        )
    elif stage == "train":
        run_train(
            TrainConfig(
                dataset=f"{work}/ds",
                base=base,
                out=f"{work}/train",
                steps=steps,
                resolution=resolution,
                mixed_precision="bf16",
                samples=False,
                device="cpu",
            ),
            log=lambda m: None,
        )
    else:
        export_parts(f"{work}/model", f"{work}/onnx")
    return {
        "stage": stage,
        "seconds": time.perf_counter() - t0,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def export_parts(model_dir: str, out: str) -> list[str]:
    """optimum's ONNX export of every component but the UNet (text encoders, VAE encoder and decoder)."""

    from optimum.exporters.onnx.convert import export_models
    from optimum.exporters.utils import get_diffusion_models_for_export

    family = model_family(model_dir)
    comps = ["text_encoder", "text_encoder_2", "vae"] if family == SDXL else ["text_encoder", "vae"]
    pipe = pipeline_without_unet(model_dir, comps)
    parts = {k: v for k, v in get_diffusion_models_for_export(pipe).items() if k != "unet"}
    export_models(
        models_and_onnx_configs=parts,
        output_dir=Path(out),
        output_names=[f"{k}/model.onnx" for k in parts],
    )
    return sorted(parts)


def pipeline_without_unet(model_dir: str, comps: list[str]) -> Any:
    """The pipeline with its UNet on the meta device: optimum's component table needs the pipeline,
    the UNet's 10 GB (SDXL, fp32) need not be loaded to export the other components."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from finestyle.core.models import pipeline_class

    loaders = {
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "vae": AutoencoderKL,
    }
    kw = {c: loaders[c].from_pretrained(model_dir, subfolder=c, use_safetensors=True) for c in comps}
    kw["tokenizer"] = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    if "text_encoder_2" in comps:
        kw["tokenizer_2"] = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2")
    with init_empty_weights():
        kw["unet"] = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(model_dir, subfolder="unet")
        )
    from diffusers import EulerDiscreteScheduler

    kw["scheduler"] = EulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    family = SDXL if "text_encoder_2" in comps else "sd"
    extras = (
        {"add_watermarker": False} if family == SDXL else {"safety_checker": None, "feature_extractor": None}
    )
    return pipeline_class(family)(**kw, **extras)


def bench_stages(
    base: str = "builtin:sdxl-random", resolution: int = 512, steps: int = 2, workdir: str | None = None
) -> dict[str, Any]:
    """Peak RSS and time of prepare, `steps` training steps (bf16, `resolution`) and the export of
    every component but the UNet, each in its own process; plus the memory guard's estimates."""
    import os
    import tempfile

    from finestyle.core.memory import GB, component_params, estimate_bytes, host_memory_bytes

    params = component_params(base) or {}
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        bench_images(f"{d}/images", n=4, size=max(resolution, 256))
        run_prepare(
            PrepareConfig(
                images=[f"{d}/images"],
                style="paper-cut",
                out=f"{d}/ds",
                concepts="none",
                resolution=resolution,
                num_beams=1,
            ),
            log=lambda m: None,
        )
        if not is_builtin(base):
            os.symlink(os.path.abspath(base), f"{d}/model")
        # a builtin is built and saved in a process of its own, so that its memory is not held here
        stages = (
            ("save", "prepare", "train", "export-parts")
            if is_builtin(base)
            else ("prepare", "train", "export-parts")
        )
        res = {
            stage: run_worker(
                f"stage_worker({stage!r}, {base!r}, {d!r}, {resolution}, {steps})", f"stage {stage}"
            )
            for stage in stages
        }
    host = host_memory_bytes()
    return {
        "base": base,
        "resolution": resolution,
        "train_steps": steps,
        "cpu": cpu_name(),
        "host_memory_gib": host / 2**30 if host else None,
        "params_millions": {k: round(v / 1e6, 1) for k, v in params.items()},
        "estimates_gib": {s: estimate_bytes(s, params) / GB for s in ("prepare", "train", "export")}
        if params
        else {},
        "stages": res,
    }
