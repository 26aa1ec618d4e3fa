"""`EvalConfig`: style, prompt and leakage evaluation of an export or adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

from finestyle.config.base import check as _check


@dataclass
class EvalConfig:
    """Evaluation: style fidelity, prompt fidelity and content leakage of a model (or of several variants)."""

    model: str = "exports/model"
    """Export folder, or a base model (hub id, folder, builtin) with `adapter`."""
    adapter: str | None = None
    """Adapter folder (RUN/adapter) on top of `model`; leakage is measured against `model` without it."""
    references: str = "data/prepared/examples"
    """The prepared dataset of the references: its concepts are what counts as leakage."""
    out: str = "runs/eval"
    """Output folder: report.json, report.md, grid.png (and guidance.png), images/."""
    prompts: str | None = None
    """Prompt file (one per line, optionally TAB superclass); default: the judge's own set."""
    judge: str = "world"
    """world | world:FOLDER | clip:MODEL (hub id, folder or builtin:tiny-clip)."""
    style: str | None = None
    """Target style text; default: the dataset's style."""
    n_prompts: int = 12
    """Prompts taken from the default set."""
    seeds: int = 4
    """Seeds per prompt."""
    steps: int = 20
    """Denoising steps."""
    guidance: float = 7.5
    """Prompt guidance λ2."""
    style_guidance: list[float] = field(default_factory=lambda: [0.0])
    """Style guidance λ1 values; several sweep the trade-off (guidance.png)."""
    batch: int = 16
    """Images per denoising batch."""
    device: str = "auto"
    """Generation and judge device: auto | cpu | cuda."""
    runtime: str = "auto"
    """Runtime of the tuned model when it is an export: auto (the fastest path the export verified on this
    machine, as `generate` picks it) | onnxruntime | openvino |
    torch | tensorrt. With `adapter` it is torch; the base model always runs in torch."""
    dtype: str = "auto"
    """Precision of the tuned model's runtime (torch, openvino): auto | fp32 | bf16 | fp16."""
    seed: int = 20_000_000
    """First seed (each prompt uses seed .. seed+seeds-1); keep it apart from any training seed."""
    calibration_seed: int = 35_000_000
    """First seed of the base-model images the world judge's object thresholds are calibrated on."""
    report_to: str = "none"
    """none | tensorboard | mlflow | tensorboard,mlflow: the figures (with their intervals) go to the
    tracked run that trained the adapter (its OUT/tracking.json), else to a new run in this OUT."""

    def __post_init__(self) -> None:
        _check(self.seeds >= 1, "eval.seeds", self.seeds, "at least 1")
        bad = {t.strip() for t in self.report_to.split(",")} - {"none", "tensorboard", "mlflow", ""}
        _check(
            not bad, "eval.report_to", self.report_to, "use none, tensorboard, mlflow or tensorboard,mlflow"
        )
        _check(
            abs(self.calibration_seed - self.seed) >= self.seeds,
            "eval.calibration_seed",
            self.calibration_seed,
            "seeds apart from seed .. seed+seeds-1",
        )
        _check(
            self.runtime in ("auto", "onnxruntime", "openvino", "torch", "tensorrt"),
            "eval.runtime",
            self.runtime,
            "use auto, onnxruntime, openvino, torch or tensorrt",
        )
        _check(
            self.dtype in ("auto", "fp32", "bf16", "fp16", "int8"),
            "eval.dtype",
            self.dtype,
            "auto|fp32|bf16|fp16|int8",
        )
        _check(self.steps >= 1, "eval.steps", self.steps, "at least 1")
        _check(self.n_prompts >= 1, "eval.n_prompts", self.n_prompts, "at least 1")
        _check(
            all(x >= 0 for x in self.style_guidance), "eval.style_guidance", self.style_guidance, "≥ 0 each"
        )
