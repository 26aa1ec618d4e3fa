"""Benchmarks that print a ratio against a baseline measured side by side in the same run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from finestyle.artifacts.dataset import load_training_rows
from finestyle.artifacts.styles import KV_UNET, load_base_kv, load_style
from finestyle.config import ExportConfig, PrepareConfig, TrainConfig
from finestyle.core.env import cpu_name
from finestyle.core.kv import project_kv
from finestyle.core.models import (
    BUILTINS,
    builtin_folder,
    is_builtin,
    load_captioner,
    load_sd_pipeline,
    model_family,
    pick_device,
    save_builtin,
)
from finestyle.core.onnxrt import ort_providers
from finestyle.core.sd import (
    SDXL,
    encode_texts,
    native_size,
    pack_cond,
    pooled_dim,
    text_encoders,
    unet_kwargs,
)
from finestyle.export.steps import onnx_export, ort_session, run_export
from finestyle.export.swappable import run_swappable_export
from finestyle.prepare.captioning import Captioner, CaptionSettings, caption_dtype
from finestyle.prepare.stage import run_prepare
from finestyle.runtime.generate import load_backend
from finestyle.train.loop import (
    add_lora,
    bucket_of,
    diffusion_loss,
    diffusion_target,
    resize_to_bucket,
    run_train,
)


def _images(n: int, size: int = 384) -> list[Any]:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [
        Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())
        for _ in range(n)
    ]


def bench_caption(
    captioner: str = "builtin:blip-base-random",
    n_images: int = 16,
    batch_size: int = 8,
    max_new_tokens: int = 20,
) -> dict[str, Any]:
    """Images/s of the project's captioning path (batched, bf16 where the CPU has it) against a plain
    fp32 one-at-a-time `generate` loop, on the same images, greedy, a fixed number of new tokens."""

    dev = pick_device()
    imgs = _images(n_images)
    model32, proc = load_captioner(captioner, device=dev, dtype=torch.float32)
    # 1. baseline: one image at a time, fp32
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, num_beams=1)
    t = time.perf_counter()
    base_caps = []
    with torch.inference_mode():
        for im in imgs:
            inputs = proc(images=im, return_tensors="pt").to(dev)
            base_caps.append(proc.decode(model32.generate(**inputs, **gen)[0], skip_special_tokens=True))
    base_s = time.perf_counter() - t
    # 2. the project's path
    dt = caption_dtype(dev, "auto")
    model = model32 if dt == torch.float32 else load_captioner(captioner, device=dev, dtype=dt)[0]
    cap = Captioner(
        model,
        proc,
        CaptionSettings(
            prefix="",
            num_beams=1,
            min_length=max_new_tokens,
            max_length=max_new_tokens,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            batch_size=batch_size,
        ),
    )
    cap.raw_batch(imgs[:1])  # warm-up (also for the baseline's first call, above, paid by it)
    t = time.perf_counter()
    proj_caps = []
    for i in range(0, n_images, batch_size):
        proj_caps += cap.raw_batch(
            imgs[i : i + batch_size],
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            num_beams=1,
        )
    proj_s = time.perf_counter() - t
    same = sum(a.strip() == b.strip() for a, b in zip(base_caps, proj_caps, strict=True))
    return {
        "captioner": captioner,
        "device": str(dev),
        "images": n_images,
        "new_tokens": max_new_tokens,
        "baseline": {"mode": "fp32, one at a time", "img_per_s": n_images / base_s},
        "project": {
            "mode": f"{str(dt).replace('torch.', '')}, batches of {batch_size}",
            "img_per_s": n_images / proj_s,
        },
        "ratio": base_s / proj_s,
        "captions_identical_to_fp32": f"{same}/{n_images}",
    }


# ------------------------------------------------------------------------------------------------
# training


def _bench_images(folder: Any, n: int = 4, size: int = 256) -> Any:
    """`n` reproducible pictures (coloured shapes on a gradient): the benchmark needs no files of its own."""
    import random
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageDraw

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = random.Random(i)
        ramp = np.linspace(0, 1, size)[None, :, None] * np.array(rng.sample(range(60, 255), 3))[None, None]
        img = Image.fromarray(np.broadcast_to(ramp, (size, size, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(size // 8, size // 3)
            fill = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=fill)
        img.save(out / f"bench-{i}.png")
    return out


def _bench_dataset(folder: str, resolution: int) -> str:
    images = _bench_images(f"{folder}-images", size=max(resolution, 64))
    run_prepare(
        PrepareConfig(
            images=[str(images)],
            style="paper-cut",
            out=folder,
            concepts="none",
            resolution=resolution,
            num_beams=1,
        ),
        log=lambda m: None,
    )
    return folder


def train_worker(
    variant: str,
    dataset: str,
    base: str,
    resolution: int,
    steps: int,
    warmup: int,
    out: str,
    device: str = "cpu",
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """One benchmark variant in its own process (so its peak RSS / VRAM is its own).

    - `baseline` / `baseline-bf16`: what diffusers' reference LoRA script does each step: VAE-encode
      the image and run the text encoder, then the UNet forward/backward (fp32 / bf16 autocast).
    - `cached` / `cached-bf16`: this project's trainer (cached latents and text), fp32 / bf16 autocast.
    """
    import resource

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(
        dataset=dataset,
        base=base,
        out=out,
        steps=warmup + steps,
        resolution=resolution,
        samples=False,
        caption_dropout=0.0,
        device=device,
        mixed_precision="bf16" if variant.endswith("-bf16") else "no",
        gradient_checkpointing=gradient_checkpointing,
    )
    t_load = time.perf_counter()
    if variant.startswith("cached"):
        import json
        from pathlib import Path

        run_train(cfg, log=lambda m: None)
        rep = json.loads((Path(out) / "report.json").read_text())
        secs = rep["step_seconds"][warmup:]
        losses = rep["losses"]
    else:
        secs, losses = _baseline_loop(cfg, warmup)
    res = {
        "variant": variant,
        "device": device,
        "steps_per_s": len(secs) / sum(secs),
        "seconds_per_step": sum(secs) / len(secs),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "wall_seconds": time.perf_counter() - t_load,  # load + cache + every step
        "losses": losses,
    }
    if cuda:
        res["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["gpu"] = torch.cuda.get_device_name()
    return res


def meta_unet(base: str) -> tuple[Any, int]:
    """The base model's UNet with its parameters on the meta device (its shapes, no memory), and the
    VAE's downsampling factor."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if is_builtin(base) and not BUILTINS[base].folder:
        with init_empty_weights():
            comps = BUILTINS[base].build()
        return comps["unet"].to("meta"), 2 ** (len(comps["vae"].config.block_out_channels) - 1)
    folder = str(builtin_folder(base) if is_builtin(base) else base)
    cfg = UNet2DConditionModel.load_config(folder, subfolder="unet")
    vae_cfg = AutoencoderKL.load_config(folder, subfolder="vae")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg).to("meta")
    return unet, 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def unet_train_step_gflop(base: str, resolution: int, device: str = "cpu") -> float:
    """FLOPs of one UNet forward + backward with the K/V LoRA (what every variant runs per step), counted
    by torch's FLOP counter at `resolution` (VAE and text encoder excluded). The UNet runs on the meta
    device: shapes only, so SDXL's 2.6B UNet is counted without allocating it."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae_scale = meta_unet(base)
    unet.requires_grad_(False)
    add_lora(unet, TrainConfig(dataset="", base=base))
    unet.to("meta")
    side = resolution // vae_scale
    x = torch.randn(1, unet.config.in_channels, side, side, device="meta")
    c = torch.randn(1, 77, unet.config.cross_attention_dim, device="meta")
    pdim = pooled_dim(unet.config)
    if pdim:
        c = pack_cond(c, torch.randn(1, pdim, device="meta"))
    kw = unet_kwargs(unet.config, c, (resolution, resolution))
    with FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor([500], device="meta"), **kw).sample.float().pow(2).mean().backward()
    return fc.get_total_flops() / 1e9


# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, without sparsity), by device name.
GPU_BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "RTX 4090": 165.0,
}


def gpu_bf16_peak_tflops(name: str) -> float | None:
    for key, peak in GPU_BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def _baseline_loop(cfg: Any, warmup: int) -> tuple[list[float], list[float]]:
    """The uncached reference loop (diffusers examples/text_to_image/train_text_to_image_lora.py)."""
    import contextlib

    import numpy as np

    rows = load_training_rows(cfg.dataset)
    dev = torch.device(cfg.device)
    bf16 = cfg.mixed_precision == "bf16"
    pipe = load_sd_pipeline(cfg.base, device=dev)
    unet, vae = pipe.unet, pipe.vae
    encoders = [enc for _, enc in text_encoders(pipe)]
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    vae.requires_grad_(False)
    for enc in encoders:
        enc.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    unet.requires_grad_(False)
    if bf16:  # as the reference script with --mixed_precision bf16: frozen weights in bf16
        for m in (unet, vae, *encoders):
            m.to(torch.bfloat16)
    add_lora(unet, cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # the LoRA weights train in fp32, as in this project's trainer
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    g = torch.Generator(dev).manual_seed(cfg.seed)
    resolution = cfg.resolution or native_size(pipe)
    secs, losses = [], []
    for step in range(cfg.steps):
        _sync(dev)
        t0 = time.perf_counter()
        r = rows[step % len(rows)]
        size = bucket_of(r["image"].size, cfg, resolution)
        img = resize_to_bucket(r["image"], size)
        px = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(dev)
        px = px.to(vae.dtype)
        latents = (vae.encode(px).latent_dist.sample(generator=g) * vae.config.scaling_factor).float()
        hidden, pooled = encode_texts(pipe, [r["text"]], dev)
        cond = pack_cond(hidden, pooled).to(unet.dtype)
        noise = torch.randn(latents.shape, generator=g, device=dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g, device=dev)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with amp:
            noisy = sched.add_noise(latents, noise, t).to(unet.dtype)
            pred = unet(noisy, t, **unet_kwargs(unet.config, cond, (size[1], size[0]))).sample
        loss = diffusion_loss(pred.float(), diffusion_target(sched, latents, noise, t), t, sched, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        _sync(dev)
        if step >= warmup:
            secs.append(time.perf_counter() - t0)
    return secs, losses


def run_worker(call: str, what: str) -> dict[str, Any]:
    """Run `call` (a finestyle.bench.suite function call returning JSON-able data) in a fresh
    process, so that its peak RSS and VRAM are its own; returns its result."""
    import json
    import os
    import subprocess
    import sys

    code = f"import json; from finestyle.bench import suite; print('RESULT' + json.dumps(suite.{call}))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    if p.returncode or not line:
        raise RuntimeError(f"bench {what} failed: {p.stderr[-2000:]}")
    return json.loads(line[0][6:])


def _sync(dev: Any) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def bench_train(
    base: str = "builtin:sd15-random",
    resolution: int = 256,
    steps: int = 3,
    warmup: int = 1,
    variants: tuple[str, ...] | None = None,
    device: str = "cpu",
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Trainer steps/s and peak memory against the uncached baseline, each in its own process.

    On CPU the variants are fp32 baseline, cached fp32 and cached bf16; on CUDA, the bf16 baseline and
    cached bf16 (peak VRAM from `torch.cuda.max_memory_allocated`), plus the achieved TFLOP/s of the
    UNet forward+backward and its share of the card's bf16 peak (MFU).
    """
    import tempfile

    device = str(pick_device(device))
    cuda = device.startswith("cuda")
    if variants is None:
        # SDXL in fp32 needs 14 GB of weights before any activation: bf16 only, as its users train it
        big = model_family(base) == SDXL
        variants = ("baseline-bf16", "cached-bf16") if cuda or big else ("baseline", "cached", "cached-bf16")
    with tempfile.TemporaryDirectory() as d:
        ds = _bench_dataset(f"{d}/ds", resolution)
        res = {}
        for v in variants:
            res[v] = run_worker(
                f"train_worker({v!r}, {ds!r}, {base!r}, {resolution}, {steps}, {warmup}, "
                f"{d + '/' + v!r}, {device!r}, {gradient_checkpointing!r})",
                f"variant {v}",
            )
    baseline = "baseline-bf16" if "baseline-bf16" in res else "baseline"
    base_sps = res[baseline]["steps_per_s"] if baseline in res else None
    gflop = unet_train_step_gflop(base, resolution, device)
    peak = gpu_bf16_peak_tflops(torch.cuda.get_device_name()) if cuda else None
    for v in res.values():
        v["ratio_vs_baseline"] = v["steps_per_s"] / base_sps if base_sps else None
        v["unet_tflops"] = gflop * v["steps_per_s"] / 1e3
        v["mfu"] = v["unet_tflops"] / peak if peak else None
    return {
        "base": base,
        "resolution": resolution,
        "batch": 1,
        "device": device,
        "cpu": cpu_name(),
        "gradient_checkpointing": gradient_checkpointing,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "measured_steps": steps,
        "warmup": warmup,
        "baseline": baseline,
        "unet_train_step_gflop": gflop,
        "gpu_bf16_peak_tflops": peak,
        "results": res,
    }


# ------------------------------------------------------------------------------------------------
# export / UNet step latency


def matmul_peak(dtype: torch.dtype, n: int = 2048, iters: int = 5, repeats: int = 3) -> float:
    """GFLOP/s of a large square matrix product in `dtype` on this CPU (the reference peak): the best
    of `repeats` timings, so that a noisy neighbour does not lower the peak the shares divide by."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t) / 1e9)
    return best


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


def _timeit(fn: Any, iters: int) -> float:
    return _timeit_sync(fn, iters, torch.device("cpu"))


def bench_unet_step(
    model: str, latent: int = 32, batch: int = 2, iters: int = 3, image_size: int | None = None
) -> dict[str, Any]:
    """One UNet step: PyTorch eager fp32 vs onnxruntime fp32 (the export) vs bf16 candidates."""
    import tempfile
    from pathlib import Path

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
        ov = _openvino_steps(Path(d), x, c, ref)
        # interleave the measurements so machine noise hits both alike
        res["torch_fp32_s"] = _timeit(torch_fp32, iters)
        res["ort_fp32_s"] = _timeit(ort_fp32, iters)
        res["torch_bf16_autocast_s"] = _timeit(torch_bf16_autocast, iters)
        res["torch_bf16_weights_s"] = _timeit(torch_bf16_weights, iters)
        for prec, (fn, _) in ov.items():
            res[f"openvino_{prec}_s"] = _timeit(fn, iters)
        res["torch_fp32_s_2"] = _timeit(torch_fp32, iters)
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
        res["whole_image"] = _whole_image(res, Path(d), src, image_size or latent * 8)
        res["ort_ops"] = _ort_op_times(Path(d) / "onnx" / "unet" / "model.onnx", feeds)
    from finestyle.runtime.openvino import hardware_precision

    # without bf16 units (AVX2) a 2048³ bf16 product runs a scalar fallback for minutes: no bf16 peak
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16) if hardware_precision() == "bf16" else None
    res["ort_breakdown"] = _ort_breakdown(res["ort_ops"], by_aten, gflop, peak32)
    res.update(
        matmul_fp32_gflops=peak32,
        matmul_bf16_gflops=peak16,
        ort_gflops=gflop / res["ort_fp32_s"],
        ort_share_of_fp32_peak=gflop / res["ort_fp32_s"] / peak32,
        cpu=cpu_name(),
    )
    res["runtimes"] = runtime_table(res)
    return res


def _ort_breakdown(ops: dict[str, float], by_aten: dict[str, float], gflop: float, peak32: float) -> dict:
    """Where onnxruntime's fp32 time goes, and the best the graph could do on this CPU: convolutions
    and matrix products at 100% of the matmul peak, every other op as measured."""
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
        peak = res["matmul_bf16_gflops" if prec == "bf16" else "matmul_fp32_gflops"]  # None: no bf16 units
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


def _openvino_steps(onnx_root: Any, x: torch.Tensor, c: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """OpenVINO UNet step callables (fp32 and bf16 where the CPU has bf16) over the exported ONNX,
    each with its mean relative difference to eager fp32; {} without OpenVINO. Compiled blobs go to
    a folder of the run, so the benchmark leaves no cache behind."""
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
    for prec in dict.fromkeys(("fp32", hardware_precision())):
        comp = OvComponent(core, onnx_root / "onnx" / "unet" / "model.onnx", prec, f"bench-{prec}")
        got = torch.from_numpy(comp(**feeds))
        rel = float((got - ref).abs().mean() / ref.abs().mean())
        out[prec] = ((lambda comp=comp: comp(**feeds)), rel)
    return out


def _whole_image(res: dict[str, Any], root: Any, src: Any, size: int) -> dict[str, Any]:
    """Text encoder + 20 steps (with guidance) + VAE decode at `size` px, on the fastest runtime of
    the step table."""
    from finestyle.runtime.generate import (
        GenerationRequest,
        generate,
        openvino_backend,
        ort_backend,
        torch_backend,
    )

    candidates = {
        "openvino_bf16_s": lambda: openvino_backend(root, "bf16", manifest={}, files={}),
        "openvino_fp32_s": lambda: openvino_backend(root, "fp32", manifest={}, files={}),
        "torch_bf16_weights_s": lambda: torch_backend(str(src), None, "cpu", "bf16"),
        "ort_fp32_s": lambda: ort_backend(root, ["CPUExecutionProvider"], manifest={}),
        "torch_fp32_s": lambda: torch_backend(str(src), None, "cpu", "fp32"),
    }
    key = min((k for k in candidates if k in res), key=lambda k: res[k])
    be = candidates[key]()
    req = GenerationRequest("a lighthouse on a cliff at night", steps=20, width=size, height=size)
    generate(be, GenerationRequest(req.prompt, steps=1, width=req.width, height=req.height))  # compile/warm
    t = time.perf_counter()
    generate(be, req)
    return {"runtime": be.name, "size": size, "steps": 20, "seconds": time.perf_counter() - t}


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
    from pathlib import Path

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
        res["torch_eager_s"] = _timeit_sync(eager, iters, dev)
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


def _timeit_sync(fn: Any, iters: int, dev: torch.device) -> float:
    fn()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / iters


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
        io.bind_input(meta.name, kind, index, _np_dtype(ten), list(ten.shape), ten.data_ptr())
    io.bind_output(sess.get_outputs()[0].name, kind, index, np.float32, list(out.shape), out.data_ptr())

    def step() -> None:
        sess.run_with_iobinding(io)

    step()
    _sync(dev)
    build = time.perf_counter() - t0
    secs = _timeit_sync(step, iters, dev)
    return {
        "status": "ran",
        "provider": sess.get_providers()[0],
        "session_and_first_run_s": build,
        "step_s": secs,
        "max_abs_diff_vs_torch": float((out - ref).abs().max()),
        "mean_abs_diff_vs_torch": float((out - ref).abs().mean()),
    }


def _np_dtype(t: torch.Tensor) -> Any:
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[t.dtype]


# ------------------------------------------------------------------------------------------------
# serving under load


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ServerProcess:
    """`finestyle serve` in a subprocess on 127.0.0.1; stopped with SIGTERM (drains)."""

    def __init__(self, export: str, extra: list[str]) -> None:
        import os
        import subprocess
        import sys

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "finestyle.cli.app", "serve", export, "--port", str(self.port), *extra],
            env=os.environ.copy(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def __enter__(self) -> _ServerProcess:
        import httpx

        t_end = time.time() + 120
        while time.time() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited during start-up")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready in 120 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def _load_level(
    url: str,
    concurrency: int,
    n_requests: int,
    steps: int,
    time_limit: float,
    size: int | None = None,
    styles: list[str] | None = None,
) -> dict[str, Any]:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import numpy as np

    lat: list[float] = []
    codes: dict[int, int] = {}
    deadline = time.time() + time_limit
    local = threading.local()  # one keep-alive connection per client thread, as a real load generator

    def one(i: int) -> None:
        if time.time() > deadline:
            return
        t = time.perf_counter()
        try:
            body: dict[str, Any] = {"prompt": f"a red boat {i}", "steps": steps, "seed": i}
            if styles:
                body["style"] = styles[i % len(styles)]
            if size:
                body.update(width=size, height=size)
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=120)
            r = local.client.post(url + "/v1/generate", json=body)
            code = r.status_code
        except httpx.HTTPError:
            code = -1
        codes[code] = codes.get(code, 0) + 1
        if code == 200:
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(n_requests)))
    wall = time.perf_counter() - t0
    ok = codes.get(200, 0)
    q = np.percentile(lat, [50, 95, 99]) if lat else [float("nan")] * 3
    return {
        "concurrency": concurrency,
        "requests": sum(codes.values()),
        "ok": ok,
        "errors": sum(v for k, v in codes.items() if k != 200),
        "codes": codes,
        "p50_s": float(q[0]),
        "p95_s": float(q[1]),
        "p99_s": float(q[2]),
        "img_per_s": ok / wall,
    }


def bench_serve(
    export: str | None = None,
    levels: tuple[int, ...] = (1, 2, 4, 8),
    requests_per_level: int = 64,
    steps: int = 4,
    time_limit: float = 60.0,
    queue_size: int = 64,
    size: int | None = None,
    max_wait_ms: float = 60.0,
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Throughput and latency with dynamic batching on and off, then an overload check."""
    import tempfile

    import httpx

    with tempfile.TemporaryDirectory() as d:
        if export is None:
            export = f"{d}/export"
            run_export(
                ExportConfig(base="builtin:tiny-sd", adapter=None, out=export, device="cpu"),
                log=lambda m: None,
            )
        out: dict[str, Any] = {
            "export": export,
            "steps": steps,
            "size": size,
            "max_wait_ms": max_wait_ms,
            "runtime": runtime,
            "levels": {},
        }
        for batching in (True, False):
            flag = "--batching" if batching else "--no-batching"
            with _ServerProcess(
                export,
                [
                    flag,
                    "--queue-size",
                    str(queue_size),
                    "--max-batch",
                    "8",
                    "--max-wait-ms",
                    str(max_wait_ms),
                    "--runtime",
                    runtime,
                ],
            ) as s:
                _load_level(s.url, 1, 2, steps, time_limit, size)  # warm-up
                out["levels"]["on" if batching else "off"] = [
                    _load_level(s.url, c, max(requests_per_level, 2 * c), steps, time_limit, size)
                    for c in levels
                ]
        on8 = out["levels"]["on"][-1]["img_per_s"]
        off8 = out["levels"]["off"][-1]["img_per_s"]
        out["batching_ratio_at_max_concurrency"] = on8 / off8 if off8 else float("nan")
        # overload: a small queue and a flood; only 503s beyond it, and the server stays up
        with _ServerProcess(export, ["--queue-size", "4", "--max-batch", "2", "--runtime", runtime]) as s:
            flood = _load_level(s.url, 24, 48, steps, time_limit, size)
            alive = httpx.get(s.url + "/healthz", timeout=5).status_code == 200
        out["overload"] = {
            "queue_size": 4,
            "concurrency": 24,
            "codes": flood["codes"],
            "server_alive": alive,
            "only_503_beyond_queue": set(flood["codes"]) <= {200, 503},
        }
    return out


def _dir_bytes(p: Any) -> int:
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def _median_interleaved(fns: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns round by round."""
    import statistics

    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_styles(
    n_styles: int = 4,
    model: str = "builtin:tiny-sd",
    requests: int = 48,
    steps: int = 4,
    concurrency: int = 8,
    time_limit: float = 60.0,
    rounds: int = 40,
    memory_only: bool = False,
) -> dict[str, Any]:
    """Many styles, one server: N adapters as one swappable export against one merged export.

    - UNet step: the shared graph with K/V inputs vs the merged UNet graph (onnxruntime, batch 2,
      interleaved medians), plus the per-request K/V projection;
    - serving at `concurrency`: every request in one style vs requests cycling through all styles
      (dynamic batching on, so mixed-style batches form);
    - disk: the swappable export with N styles vs N merged exports (one measured, times N);
    - memory: a `finestyle serve` process's resident memory after one request, on the swappable
      export and on one merged export (N merged servers: that, times N, computed).

    `memory_only` skips the timings and the load (for large models on a CPU, where they would take
    hours) and proves parity with one denoising step instead of four."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        ds = _bench_dataset(f"{d}/ds", 64)
        adapters = []
        for i in range(n_styles):
            cfg = TrainConfig(
                dataset=ds,
                base=model,
                out=f"{d}/run{i}",
                steps=2,
                lr=1e-2,
                resolution=64,
                rank=8,
                samples=False,
                seed=i,
            )
            adapters.append(run_train(cfg, log=lambda m: None).adapter)
        names = [f"style{i}" for i in range(n_styles)]
        swx, merged = f"{d}/swappable", f"{d}/merged"
        parity_steps = 1 if memory_only else 4
        run_swappable_export(model, adapters, names, swx, parity_steps=parity_steps, log=lambda m: None)
        light = dict(check_bf16=False, check_openvino=False) if memory_only else {}
        run_export(
            ExportConfig(
                base=model, adapter=adapters[0], out=merged, device="cpu", parity_steps=parity_steps, **light
            ),
            log=lambda m: None,
        )
        out: dict[str, Any] = {
            "model": model,
            "styles": n_styles,
            "cpu": cpu_name(),
            "disk_swappable_bytes": _dir_bytes(swx),
            "disk_one_style_bytes": _dir_bytes(Path(swx) / "styles" / names[0]),
            "disk_one_merged_export_bytes": _dir_bytes(merged),
        }
        out["disk_n_merged_bytes_computed"] = out["disk_one_merged_export_bytes"] * n_styles
        out["memory_swappable_server"] = _server_memory(swx, names[-1])
        out["memory_one_merged_server"] = _server_memory(merged, None)
        out["memory_n_merged_servers_rss_bytes_computed"] = (
            out["memory_one_merged_server"]["rss_bytes"] * n_styles
        )
        if not memory_only:
            out.update(_styles_unet_step(swx, merged, names[0], rounds))
            out.update(_styles_serving(swx, names, requests, steps, concurrency, time_limit))
    return out


def _server_memory(export: str, style: str | None) -> dict[str, Any]:
    """A `finestyle serve` process's memory after one request (1 step, 64 px): resident (VmRSS)
    and peak (VmHWM), from /proc."""
    import httpx

    with _ServerProcess(export, ["--batching" if style else "--no-batching"]) as s:
        body: dict[str, Any] = {"prompt": "a red boat", "steps": 1, "width": 64, "height": 64}
        if style:
            body["style"] = style
        r = httpx.post(s.url + "/v1/generate", json=body, timeout=600)
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {r.text[:200]}")
        status = Path(f"/proc/{s.proc.pid}/status").read_text()
    fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
    return {"rss_bytes": int(fields["VmRSS"]) * 1024, "peak_rss_bytes": int(fields["VmHWM"]) * 1024}


def _styles_unet_step(swx: str, merged: str, style: str, rounds: int) -> dict[str, Any]:
    """The shared graph with K/V inputs vs the merged UNet, batch 2, interleaved medians."""
    import numpy as np

    be = load_backend(swx)
    layers = be.manifest["swappable"]["layers"]
    base_kv = load_base_kv(Path(swx))
    st = load_style(Path(swx), style, be.manifest)
    merged_sess = ort_session(Path(merged) / "onnx/unet/model.onnx")
    kv_sess = ort_session(Path(swx) / KV_UNET)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, be.latent_channels, be.native_size, be.native_size, generator=g)
    emb = torch.randn(2, 77, base_kv[f"{layers[0]}.to_k.weight"].shape[1], generator=g)
    kv = project_kv(emb, layers, base_kv, [st, st])
    t = np.array(500.0, np.float32)
    f_merged = {"sample": x.numpy(), "timestep": t, "encoder_hidden_states": emb.numpy()}
    f_kv = {"sample": x.numpy(), "timestep": t, **{f"kv_{i}": k.numpy() for i, k in enumerate(kv)}}
    med = _median_interleaved(
        {
            "merged": lambda: merged_sess.run(None, f_merged),
            "kv_inputs": lambda: kv_sess.run(None, f_kv),
            "project_kv": lambda: project_kv(emb, layers, base_kv, [st, st]),
        },
        rounds,
    )
    return {
        "unet_step_merged_s": med["merged"],
        "unet_step_kv_s": med["kv_inputs"],
        "kv_step_vs_merged": med["kv_inputs"] / med["merged"],
        "project_kv_per_request_s": med["project_kv"],
    }


def _styles_serving(
    swx: str, names: list[str], requests: int, steps: int, concurrency: int, time_limit: float
) -> dict[str, Any]:
    """One style for every request vs requests cycling through the styles, at `concurrency`."""
    with _ServerProcess(swx, ["--max-batch", "8", "--queue-size", "64"]) as s:
        _load_level(s.url, 1, 2, steps, time_limit, styles=names[:1])  # warm-up
        single = _load_level(s.url, concurrency, requests, steps, time_limit, styles=names[:1])
        mixed = _load_level(s.url, concurrency, requests, steps, time_limit, styles=names)
        single2 = _load_level(s.url, concurrency, requests, steps, time_limit, styles=names[:1])
    base_rate = (single["img_per_s"] + single2["img_per_s"]) / 2
    return {
        "serve_single_style": [single, single2],
        "serve_mixed_styles": mixed,
        "mixed_vs_single_throughput": mixed["img_per_s"] / base_rate if base_rate else float("nan"),
    }


# ------------------------------------------------------------------------------------------------
# stages: peak host memory and time of prepare, a few training steps and the non-UNet export


def stage_worker(stage: str, base: str, work: str, resolution: int, steps: int) -> dict[str, Any]:
    """One stage in its own process, so that its peak RSS is its own.

    - `prepare`: attention concepts located by `base` on two example images (tiny BLIP captions).
    - `train`: `steps` cached bf16 training steps at `resolution` (latents and text cached first).
    - `export-parts`: optimum's ONNX export of the text encoder(s) and the VAE, read from `base`
      saved as a folder: every component of an export but the UNet.
    - `save`: build a builtin and write it as that folder.
    """
    import resource
    from pathlib import Path

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
    from pathlib import Path

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
        _bench_images(f"{d}/images", n=4, size=max(resolution, 256))
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
