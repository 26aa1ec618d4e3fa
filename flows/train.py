"""`train_adapter` flow: one task wraps the library's train function and returns the adapter path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task

from finestyle.config import TrainConfig, from_dict, to_dict
from finestyle.eval.checkpoints import train_with_eval
from finestyle.train.loop import TrainResult
from flows.common import RETRY, inline_image, markdown, run_log, table


@task(**RETRY)
def train_task(config: dict[str, Any]) -> TrainResult:
    """Train (or reuse an identical finished run; resume from a checkpoint after a crash); with
    eval_every, score the checkpoints and select adapter/ (`select`)."""
    return train_with_eval(from_dict(TrainConfig, config), log=run_log())


@task
def publish_train_artifacts(result: TrainResult) -> None:
    rep = json.loads((Path(result.out) / "report.json").read_text())
    losses = rep.get("losses", [])
    every = max(1, len(losses) // 20)
    table(
        "train-loss",
        [{"step": i + 1, "loss": round(v, 5)} for i, v in enumerate(losses) if i % every == 0],
        "Training loss",
    )
    samples = sorted(str(p) for p in Path(result.samples_dir).glob("*.png"))
    markdown(
        "train-summary",
        (
            f"# train: {'reused' if result.reused else 'trained'} `{result.adapter}`\n\n"
            f"- steps: {rep['steps']} at {rep['steps_per_s']:.2f} steps/s on {rep['device']} ({rep['autocast']})\n"
            f"- trainable parameters: {rep['trainable_params']:,} ({100 * rep['trainable_share']:.3f}% of the UNet)\n"
            f"- final loss: {rep['final_loss']:.4f}; peak memory {rep['peak_memory_gib']:.2f} GiB\n"
            f"- loss curve: `{result.out}/loss.png`; report: `{result.out}/report.json`\n"
            + (
                f"- adapter/ holds step {rep['selection']['step']} ({rep['selection']['mode']}): "
                f"{rep['selection']['figures']}; `{result.out}/eval.png`\n"
                if "selection" in rep
                else ""
            )
            + "".join(f"- sample: `{s}`\n" for s in samples)
            + f"\n{inline_image(Path(result.out) / 'loss.png', 'loss curve')}\n\n"
            + (f"{inline_image(samples[-1], 'last samples')}\n" if samples else "")
        ),
        "FineStyle training summary",
    )


@flow(name="train_adapter", log_prints=True)
def train_adapter(config: dict[str, Any] | None = None) -> TrainResult:
    """Stage 2 as a flow; returns the adapter path and a small summary."""
    cfg = from_dict(TrainConfig, config or {})
    result = train_task(to_dict(cfg))
    publish_train_artifacts(result)
    return result
