"""The `finestyle` console script: the library's CLI plus the commands that run Prefect flows.

`finestyle run` and `finestyle demo` run the DAG as a Prefect flow, so they live here, in the
orchestration layer; the library (`finestyle/`) never imports prefect or flows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from finestyle.cli.app import app, command, print_summary
from finestyle.cli.app import main as _library_main
from finestyle.core.errors import UserError

# ------------------------------------------------------------------------------------------------
# run / demo


@app.command()
@command
def run(
    config: Path = typer.Argument(..., help="Pipeline YAML (workdir, prepare, train, export)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override, e.g. train.steps=100."),
    force: Optional[list[str]] = typer.Option(None, "--force", help="Re-run a stage: prepare|train|export."),
) -> None:
    """Run the whole DAG (prepare -> train -> export) as one Prefect flow run."""
    from finestyle.config import load_pipeline_config

    cfg = load_pipeline_config(config, set_ or [])
    _run_pipeline(cfg, force or [])


@app.command()
@command
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Work folder for the demo run."),
    steps: int = typer.Option(60, help="Training steps."),
    base: str = typer.Option(
        "builtin:tiny-sd", "--base", help="Base model: builtin:tiny-sd, builtin:tiny-sdxl, or any SD/SDXL."
    ),
    force: Optional[list[str]] = typer.Option(None, "--force", help="Re-run a stage: prepare|train|export."),
) -> None:
    """The whole DAG on builtin models and data/examples, offline, in minutes on a CPU."""
    from finestyle.config import PipelineConfig, PrepareConfig, TrainConfig

    examples = Path(__file__).resolve().parent.parent / "data" / "examples"
    if not examples.is_dir():
        examples = Path("data/examples")
    cfg = PipelineConfig(
        workdir=str(out),
        prepare=PrepareConfig(images=[str(examples)], base=base, resolution=64, batch_size=8, num_beams=1),
        # the training resolution follows the base model (64 px for the tiny builtins)
        train=TrainConfig(
            base=base, steps=steps, checkpoint_every=max(steps // 2, 1), sample_steps=10, lr=1e-3
        ),
        generate_prompt="a lighthouse on a cliff, in flat pastel paper-cut illustration style",
    )
    _run_pipeline(cfg, force or [])


def _run_pipeline(cfg: Any, force: list[str]) -> None:
    bad = set(force) - {"prepare", "train", "export"}
    if bad:
        raise UserError(f"--force: unknown stage {sorted(bad)[0]!r}; use prepare, train or export")
    from finestyle.config import to_dict
    from flows.pipeline import finestyle_pipeline

    result = finestyle_pipeline(config=to_dict(cfg), force=list(force))
    print_summary("pipeline: done", result.summary)


def main() -> None:
    """Console-script entry point: the library's commands plus run and demo."""
    _library_main()


if __name__ == "__main__":
    main()
