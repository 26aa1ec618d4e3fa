"""The pipeline file: one YAML that holds every stage's config, with CLI overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from finestyle.config.base import check as _check
from finestyle.config.base import from_dict, load_yaml
from finestyle.config.eval import EvalConfig
from finestyle.config.export import ExportConfig
from finestyle.config.prepare import PrepareConfig
from finestyle.config.train import TrainConfig
from finestyle.core.errors import UserError

T = TypeVar("T")


@dataclass
class PipelineConfig:
    """The whole DAG: prepare -> train -> export (-> one generated image)."""

    workdir: str = "runs/pipeline"
    """Folder that receives dataset/, train/, export/ unless a stage's `out` is set explicitly."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    """Stage 1 settings."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Stage 2 settings (`dataset` and `base` are filled from prepare when left default)."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Stage 3 settings (`base` and `adapter` are filled from train)."""
    generate_prompt: str | None = None
    """If set, generate one image from the export at the end."""
    eval: EvalConfig | None = None
    """Optional stage 4: evaluate the export against the prepared dataset (`model`, `references` and
    `out` are filled from the other stages when left default)."""
    task_runner: str = "default"
    """Prefect task runner for mapped prepare work: default (threads) | dask."""
    review: bool = False
    """Pause after prepare until a person approves the dataset (review page, or Prefect's Resume form)."""
    review_host: str = "127.0.0.1"
    """Address of the review page the paused run serves."""
    review_port: int = 8765
    """Port of that page (0: no page; approve or reject in Prefect's UI)."""
    review_timeout: int = 86400
    """Seconds the run waits for a decision before it fails, training nothing."""

    def __post_init__(self) -> None:
        _check(
            self.task_runner in ("default", "dask"), "task_runner", self.task_runner, "use default or dask"
        )
        _check(self.review_timeout > 0, "review_timeout", self.review_timeout, "give seconds > 0")
        _check(
            0 <= self.review_port < 65536, "review_port", self.review_port, "give a port, or 0 for no page"
        )


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML and apply `section.key=value` overrides (CLI wins over the file)."""
    data = load_yaml(path)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected section.key=value, e.g. train.steps=100")
        key, value = item.split("=", 1)
        import yaml

        parsed = yaml.safe_load(value) if value else value
        parts = key.split(".")
        cur = data
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
            if not isinstance(cur, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
        cur[parts[-1]] = parsed
    return from_dict(PipelineConfig, data)
