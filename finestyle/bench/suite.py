"""Benchmarks that print a ratio against a baseline measured side by side in the same run."""

from __future__ import annotations

import time
from typing import Any

import torch

from finestyle.artifacts.dataset import load_training_rows
from finestyle.config import ExportConfig, PrepareConfig, TrainConfig
from finestyle.core.models import load_captioner, load_sd_pipeline, pick_device, save_builtin
from finestyle.core.onnxrt import ort_providers
from finestyle.export.steps import onnx_export, ort_session, run_export
from finestyle.prepare.captioning import Captioner, CaptionSettings, caption_dtype
from finestyle.prepare.stage import run_prepare
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


def _bench_dataset(folder: str, resolution: int) -> str:
    from pathlib import Path

    examples = Path(__file__).resolve().parent.parent / "data" / "examples"
    run_prepare(
        PrepareConfig(
            images=[str(examples)],
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
    variant: str, dataset: str, base: str, resolution: int, steps: int, warmup: int, out: str
) -> dict[str, Any]:
    """One benchmark variant in its own process (so its peak RSS is its own).

    - `baseline`: what diffusers' reference LoRA script does each step: VAE-encode the image and run
      the text encoder, then the UNet forward/backward (fp32).
    - `cached` / `cached-bf16`: this project's trainer (cached latents and text), fp32 / bf16 autocast.
    """
    import resource

    cfg = TrainConfig(
        dataset=dataset,
        base=base,
        out=out,
        steps=warmup + steps,
        resolution=resolution,
        samples=False,
        caption_dropout=0.0,
        device="cpu",
        mixed_precision="bf16" if variant == "cached-bf16" else "no",
    )
    if variant.startswith("cached"):
        import json
        from pathlib import Path

        run_train(cfg, log=lambda m: None)
        rep = json.loads((Path(out) / "report.json").read_text())
        secs = rep["step_seconds"][warmup:]
        losses = rep["losses"]
    else:
        secs, losses = _baseline_loop(cfg, warmup)
    return {
        "variant": variant,
        "steps_per_s": len(secs) / sum(secs),
        "seconds_per_step": sum(secs) / len(secs),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "losses": losses,
    }


def _baseline_loop(cfg: Any, warmup: int) -> tuple[list[float], list[float]]:
    """The uncached reference loop (diffusers examples/text_to_image/train_text_to_image_lora.py)."""
    import numpy as np

    rows = load_training_rows(cfg.dataset)
    pipe = load_sd_pipeline(cfg.base, device="cpu")
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    vae.requires_grad_(False)
    te.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    unet.requires_grad_(False)
    add_lora(unet, cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    secs, losses = [], []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        r = rows[step % len(rows)]
        img = resize_to_bucket(r["image"], bucket_of(r["image"].size, cfg))
        px = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        latents = vae.encode(px).latent_dist.sample(generator=g) * vae.config.scaling_factor
        ids = tok(
            [r["text"]],
            padding="max_length",
            truncation=True,
            max_length=tok.model_max_length,
            return_tensors="pt",
        ).input_ids
        emb = te(ids)[0]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g)
        pred = unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=emb).sample
        loss = diffusion_loss(pred, diffusion_target(sched, latents, noise, t), t, sched, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= warmup:
            secs.append(time.perf_counter() - t0)
    return secs, losses


def bench_train(
    base: str = "builtin:sd15-random",
    resolution: int = 256,
    steps: int = 3,
    warmup: int = 1,
    variants: tuple[str, ...] = ("baseline", "cached", "cached-bf16"),
) -> dict[str, Any]:
    """Trainer steps/s and peak memory against the uncached baseline, each in its own process."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ds = _bench_dataset(f"{d}/ds", resolution)
        res = {}
        for v in variants:
            code = (
                "import json,sys; from finestyle.bench.suite import train_worker; "
                f"print('RESULT'+json.dumps(train_worker({v!r}, {ds!r}, {base!r}, {resolution}, {steps}, {warmup}, "
                f"{d + '/' + v!r})))"
            )
            p = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy()
            )
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
            if p.returncode or not line:
                raise RuntimeError(f"bench variant {v} failed: {p.stderr[-2000:]}")
            res[v] = json.loads(line[0][6:])
    base_sps = res["baseline"]["steps_per_s"] if "baseline" in res else None
    for v in res.values():
        v["ratio_vs_baseline"] = v["steps_per_s"] / base_sps if base_sps else None
    return {
        "base": base,
        "resolution": resolution,
        "batch": 1,
        "measured_steps": steps,
        "warmup": warmup,
        "results": res,
    }


# ------------------------------------------------------------------------------------------------
# export / UNet step latency


def matmul_peak(dtype: torch.dtype, n: int = 2048, iters: int = 5) -> float:
    """GFLOP/s of a large square matrix product in `dtype` on this CPU (the reference peak)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b)
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e9


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
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def bench_unet_step(model: str, latent: int = 32, batch: int = 2, iters: int = 3) -> dict[str, Any]:
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
        # interleave the measurements so machine noise hits both alike
        res["torch_fp32_s"] = _timeit(torch_fp32, iters)
        res["ort_fp32_s"] = _timeit(ort_fp32, iters)
        res["torch_bf16_autocast_s"] = _timeit(torch_bf16_autocast, iters)
        res["torch_bf16_weights_s"] = _timeit(torch_bf16_weights, iters)
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
        res["ort_ops"] = _ort_op_times(Path(d) / "onnx" / "unet" / "model.onnx", feeds)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    # Where the fp32 time goes, and the best the graph could do on this CPU: convolutions and
    # matrix products at 100% of the matmul peak, every other op as measured.
    ops = res["ort_ops"]
    conv_gflop = by_aten.get("aten.convolution", 0.0)
    mm_gflop = gflop - conv_gflop
    conv_s = ops.get("Conv", 0.0) + ops.get("FusedConv", 0.0)
    mm_s = sum(ops.get(k, 0.0) for k in ("MatMul", "Gemm", "FusedMatMul"))
    other_s = max(sum(ops.values()) - conv_s - mm_s, 0.0)
    res["ort_breakdown"] = {
        "conv_gflop": conv_gflop,
        "conv_ms": conv_s * 1e3,
        "conv_share_of_peak": conv_gflop / conv_s / peak32 if conv_s else float("nan"),
        "matmul_gflop": mm_gflop,
        "matmul_ms": mm_s * 1e3,
        "matmul_share_of_peak": mm_gflop / mm_s / peak32 if mm_s else float("nan"),
        "other_ops_ms": other_s * 1e3,
        "ceiling_share_of_peak": gflop / (gflop / peak32 + other_s) / peak32,
    }
    res.update(
        matmul_fp32_gflops=peak32,
        matmul_bf16_gflops=peak16,
        ort_gflops=gflop / res["ort_fp32_s"],
        ort_share_of_fp32_peak=gflop / res["ort_fp32_s"] / peak32,
    )
    return res


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
    url: str, concurrency: int, n_requests: int, steps: int, time_limit: float, size: int | None = None
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
            body = {"prompt": f"a red boat {i}", "steps": steps, "seed": i}
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
        with _ServerProcess(export, ["--queue-size", "4", "--max-batch", "2"]) as s:
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
