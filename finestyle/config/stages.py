"""One configuration dataclass per stage, and the pipeline file that holds them all.

`__post_init__` only validates (no side effects: Prefect rebuilds parameters and re-runs it). Each
error names the field, the bad value and what is allowed. A YAML file holds a whole pipeline:

    workdir: runs/my-style
    prepare: {images: [data/examples], style: watercolor painting}
    train: {steps: 500, rank: 8}
    export: {optimize: true}

CLI options override file values (`apply_overrides`).
"""

from __future__ import annotations

from finestyle.config.eval import EvalConfig
from finestyle.config.export import ExportConfig
from finestyle.config.inference import EMPTY_PROMPT, SCHEDULERS, GenerateConfig, RequestOptions, ServeConfig
from finestyle.config.pipeline import PipelineConfig, T, load_pipeline_config
from finestyle.config.prepare import DEFAULT_STYLE, PrepareConfig
from finestyle.config.train import TARGET_PRESETS, TrainConfig

__all__ = [
    "DEFAULT_STYLE",
    "EMPTY_PROMPT",
    "EvalConfig",
    "ExportConfig",
    "GenerateConfig",
    "PipelineConfig",
    "PrepareConfig",
    "RequestOptions",
    "SCHEDULERS",
    "ServeConfig",
    "T",
    "TARGET_PRESETS",
    "TrainConfig",
    "load_pipeline_config",
]
