"""Inference settings: one request's options, `finestyle generate` and `finestyle serve`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from finestyle.config.base import check as _check
from finestyle.core.errors import UserError

# Sampler names accepted by `generate --scheduler` and the server (diffusers classes, configured from
# the model's scheduler_config.json so the noise schedule stays the model's).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD1.5 ships it
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


EMPTY_PROMPT = (
    "prompt: empty; give the text to draw, e.g. 'a red boat' (the CLI and the server refuse it alike)"
)


@dataclass
class RequestOptions:
    """What one generation asks for. `generate`'s options, the runtime's request and the server's two
    request bodies all derive from these fields: their names, types, defaults and docs."""

    prompt: str = "a lighthouse on a cliff"
    """The prompt; add or remove concept words to steer what the style covers."""
    negative_prompt: str = ""
    """Negative prompt."""
    steps: int = 20
    """Denoising steps."""
    guidance: float = 7.5
    """Prompt (classifier-free) guidance weight λ2; 1 = off."""
    style_guidance: float = 0.0
    """Style guidance weight λ1: + λ1·(tuned(prompt) - base(prompt)); 0 = off."""
    width: int | None = None
    """Image width (multiple of 8); default: the model's native size."""
    height: int | None = None
    """Image height (multiple of 8); default: the model's native size."""
    seed: int = 0
    """Seed; the same seed gives the same image on the same backend."""
    num_images: int = 1
    """Images per prompt."""
    scheduler: str | None = None
    """Sampler: ddim | pndm | euler | euler_a | dpmpp_2m | dpmpp_2m_karras | unipc | ddpm (None: the model's)."""
    style: str | None = None
    """A swappable export's style (None: its default style)."""

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise UserError(
                f"generate.scheduler: unknown scheduler {self.scheduler!r}; use one of: {', '.join(SCHEDULERS)}"
            )
        if not self.prompt.strip():
            raise UserError(EMPTY_PROMPT)
        _check(1 <= self.steps <= 1000, "generate.steps", self.steps, "must be 1..1000")
        _check(self.guidance >= 0, "generate.guidance", self.guidance, "must be >= 0")
        _check(self.style_guidance >= 0, "generate.style_guidance", self.style_guidance, "must be >= 0")
        for name in ("width", "height"):
            v = getattr(self, name)
            _check(v is None or (v % 8 == 0 and v >= 8), f"generate.{name}", v, "must be a multiple of 8")
        _check(1 <= self.num_images <= 64, "generate.num_images", self.num_images, "must be 1..64")


@dataclass
class GenerateConfig(RequestOptions):
    """Inference: one or more images from an export or a model (the request options, plus where)."""

    model: str = "exports/model"
    """Export folder (verified by its manifest), or a diffusers folder / builtin for torch."""
    out: str = "generated.png"
    """Output PNG; with several images, -1, -2, ... are appended."""
    exclude_concepts: list[str] = field(default_factory=list)
    """Reference concepts to keep out; appended to the negative prompt."""
    runtime: str = "auto"
    """auto | onnxruntime | openvino | tensorrt | torch. auto: an export runs on the fastest path it
    verified on this machine (OpenVINO bf16 on CPUs with bf16 units, the GPU providers on a GPU, else
    onnxruntime fp32, the path equal to the export's parity checks); anything else on torch."""
    providers: list[str] | None = None
    """onnxruntime execution providers in order (default: TensorRT, CUDA, CPU as available)."""
    adapter: str | None = None
    """torch runtime: an adapter folder to load on top of `model`."""
    dtype: str = "auto"
    """torch and openvino precision: auto | fp32 | bf16 (fast CPU path) | fp16 | int8 (openvino, an
    export quantized with `export --quantize int8`). auto: fp32 for torch on a CPU; for openvino, int8
    where the export's int8 guard passed, else bf16 where the CPU has bf16 units and its check passed."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.exclude_concepts, str):
            self.exclude_concepts = [w.strip() for w in self.exclude_concepts.split(",") if w.strip()]
        _check(
            self.runtime in ("auto", "onnxruntime", "openvino", "tensorrt", "torch"),
            "generate.runtime",
            self.runtime,
            "use auto, onnxruntime, openvino, tensorrt or torch",
        )
        _check(
            self.dtype in ("auto", "fp32", "bf16", "fp16", "int8"),
            "generate.dtype",
            self.dtype,
            "use auto, fp32, bf16, fp16 or int8",
        )

    def request(self, negative_prompt: str) -> RequestOptions:
        """The runtime's request: these options, with the exclusions already in `negative_prompt`."""
        values = {f.name: getattr(self, f.name) for f in fields(RequestOptions)}
        return RequestOptions(**{**values, "negative_prompt": negative_prompt})


@dataclass
class ServeConfig:
    """The HTTP inference server: limits, queue and dynamic batching."""

    export: str = "exports/model"
    """Export folder to serve (verified by its manifest at start-up), or `models:/NAME/N`, a version that
    `export --register mlflow` registered (MLflow's tracking URI from $MLFLOW_TRACKING_URI)."""
    host: str = "127.0.0.1"
    """Bind address; 127.0.0.1 unless you put it behind a gateway on purpose."""
    port: int = 8000
    """Port."""
    runtime: str = "auto"
    """auto | onnxruntime | openvino | torch | tensorrt (the export's engines; not yet run on a GPU).
    auto: the fastest path the export verified on this machine (OpenVINO bf16 on CPUs with bf16 units,
    the GPU providers on a GPU, else onnxruntime fp32); the start line and /healthz say which and why."""
    providers: list[str] | None = None
    """onnxruntime execution providers in order (default: TensorRT, CUDA, CPU as available)."""
    dtype: str = "auto"
    """torch and openvino precision: auto | fp32 | bf16 (fast CPU path) | fp16 | int8 (openvino)."""
    max_prompt_tokens: int = 77
    """Longest prompt/negative prompt accepted, in tokenizer tokens (incl. start/end)."""
    min_steps: int = 1
    """Fewest denoising steps accepted."""
    max_steps: int = 50
    """Most denoising steps accepted."""
    max_size: int | None = None
    """Largest width/height accepted (multiples of 8); default: twice the model's native size (1024 for
    SD 1.5, 2048 for SDXL)."""
    max_images: int = 4
    """Most images per request."""
    max_body_bytes: int = 16_384
    """Largest request body accepted (413 beyond)."""
    queue_size: int = 32
    """Requests waiting at most; beyond, 503 with Retry-After."""
    max_batch: int = 8
    """Most images in one batched denoising loop."""
    max_wait_ms: float = 60.0
    """How long the batcher waits for more same-shape requests (only while there is concurrency:
    a lone client is served at once)."""
    max_gap_ms: float = 10.0
    """The batcher also stops waiting once no request has arrived for this long: a burst of
    requests is over, and waiting the rest of `max_wait_ms` would only add latency."""
    batching: bool = True
    """Dynamic batching on/off (off: one request per loop)."""
    timeout_s: float = 120.0
    """Per-request timeout (504 beyond)."""
    drain_s: float = 30.0
    """On shutdown, how long requests in flight may finish."""
    batch_sizes: list[int] | None = None
    """Batch sizes (images) the batcher forms: of the requests it gathered, it runs the largest listed
    size and keeps the rest for the next loop (default: any size 1..max_batch). On OpenVINO every
    size is its own compiled shape with its own copy of the packed weights, so fewer sizes bound the
    server's memory; `--warmup` compiles exactly these."""
    warmup: str = "auto"
    """auto | on | off: before turning ready, run one 1-step loop at every batch size the batcher can
    form (`batch_sizes`, else 1..max_batch; native size, default guidance), so no request pays a
    compile. auto: on for --runtime openvino, which compiles each input shape on first use."""

    def __post_init__(self) -> None:
        _check(
            self.runtime in ("auto", "onnxruntime", "openvino", "torch", "tensorrt"),
            "serve.runtime",
            self.runtime,
            "use auto, onnxruntime, openvino, torch or tensorrt",
        )
        _check(1 <= self.port <= 65535, "serve.port", self.port, "must be 1..65535")
        _check(
            1 <= self.min_steps <= self.max_steps,
            "serve.min_steps/max_steps",
            (self.min_steps, self.max_steps),
            "need 1 <= min_steps <= max_steps",
        )
        _check(
            self.max_size is None or (self.max_size >= 8 and self.max_size % 8 == 0),
            "serve.max_size",
            self.max_size,
            "multiple of 8",
        )
        for name in ("max_images", "max_body_bytes", "queue_size", "max_batch", "max_prompt_tokens"):
            _check(getattr(self, name) >= 1, f"serve.{name}", getattr(self, name), "must be >= 1")
        _check(self.max_wait_ms >= 0, "serve.max_wait_ms", self.max_wait_ms, "must be >= 0")
        _check(self.max_gap_ms >= 0, "serve.max_gap_ms", self.max_gap_ms, "must be >= 0")
        _check(self.timeout_s > 0, "serve.timeout_s", self.timeout_s, "must be > 0")
        _check(
            self.batch_sizes is None
            or (bool(self.batch_sizes) and all(1 <= b <= self.max_batch for b in self.batch_sizes)),
            "serve.batch_sizes",
            self.batch_sizes,
            "sizes between 1 and max_batch",
        )
        _check(self.warmup in ("auto", "on", "off"), "serve.warmup", self.warmup, "use auto, on or off")
