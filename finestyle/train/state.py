"""A training run's state, hooks and result, and the key that says when a finished run can be reused."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finestyle.artifacts.dataset import dataset_fingerprint
from finestyle.config import TrainConfig, keyed_fields
from finestyle.core.errors import FineStyleError
from finestyle.core.fs import hash_json
from finestyle.core.models import model_fingerprint
from finestyle.train.data import Example


class TrainingDiverged(FineStyleError):
    """The loss became NaN/inf. The message names the step; the last good checkpoint is kept."""


def log_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dataset_style(folder: str) -> str | None:
    rep = Path(folder) / "report.json"
    if rep.exists():
        try:
            return json.loads(rep.read_text()).get("config", {}).get("style")
        except ValueError:
            return None
    return None


EVAL_FIELDS = ("eval_every", "eval_judge", "eval_prompts", "eval_seeds", "eval_steps")


def train_cache_key(cfg: TrainConfig) -> str:
    """Content key of a training run: dataset fingerprint + base + every option that changes weights.

    Checkpoint evaluation changes adapter/ only when it selects the weights (`select=best`)."""
    conf = keyed_fields(cfg, skip=EVAL_FIELDS if cfg.select == "last" else ())
    return hash_json(
        {
            "stage": "train",
            "v": 1,
            "dataset": dataset_fingerprint(cfg.dataset),
            "base": model_fingerprint(cfg.base),
            "config": conf,
        }
    )


@dataclass
class TrainResult:
    """What a training run made: the adapter, the run folder and its figures.

    A data-parallel worker (rank > 0) returns only the paths, steps and its rank; rank 0 reports.
    `selected_step` and `selection` are set when checkpoint evaluation chose adapter/."""

    adapter: str
    out: str
    steps: int
    steps_per_s: float = 0.0
    final_loss: float = float("nan")
    trainable_params: int = 0
    samples_dir: str = ""
    cache_key: str = ""
    reused: bool = False
    rank: int = 0
    selected_step: int | None = None
    selection: dict[str, float] | None = None


@dataclass
class TrainHooks:
    """Callbacks into the loop, for evaluation at checkpoints, progress reporting and tests.

    `on_step(state)` runs after every optimizer step; `on_checkpoint(state, path)` after each saved
    checkpoint (rank 0 only). The train package never imports their callers.
    """

    on_step: Callable[[TrainState], None] | None = None
    on_checkpoint: Callable[[TrainState, Path], None] | None = None


@dataclass
class TrainState:
    """Everything one training run holds between setup, the steps and finish."""

    cfg: TrainConfig
    out: Path
    world: int
    rank: int
    device: torch.device
    amp: torch.dtype | None
    pipe: Any = None
    model: Any = None
    noise_sched: Any = None
    frozen_dtype: torch.dtype = torch.float32
    rows: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: str = ""
    examples: list[Example] = field(default_factory=list)
    latent_cache: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    text_emb: torch.Tensor | None = None
    scaling: float = 1.0
    lcfg: Any = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    optimizer: Any = None
    lr_sched: Any = None
    scaler: Any = None
    gen: torch.Generator | None = None
    step: int = 0
    epoch: int = 0
    pos: int = 0
    batches: list[list[int]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    tracker: Any = None  # core.tracking.RunTracker with --report-to, on the main process
    steps_this_run: int = 0
    style: str = "the reference"
    prompts: list[str] = field(default_factory=list)
    cache_s: float = 0.0
    t_start: float = 0.0
    resolution: int = 512  # the training resolution: cfg's, else the base model's native size

    shift: float = 0.0  # the VAE's latent shift (SD 3.x, FLUX.1), subtracted before scaling
    family: str = "sd"

    @property
    def unet(self) -> Any:
        """The denoiser being adapted: the UNet, or the SD 3.x / FLUX.1 transformer."""
        from finestyle.core.sd import denoiser

        return denoiser(self.pipe)

    @property
    def main_proc(self) -> bool:
        return self.rank == 0
