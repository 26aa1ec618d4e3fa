"""The `finestyle` console script: the library's CLI plus the commands that run Prefect flows.

`finestyle run` and `finestyle demo` run the DAG as a Prefect flow, so they live here, in the
orchestration layer; the library (`finestyle/`) never imports prefect or flows.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional

import typer

from finestyle.cli.app import app, command, print_summary
from finestyle.cli.app import main as _library_main
from finestyle.core.errors import UserError
from finestyle.review import FLOW_RUN_DECIDERS

# ------------------------------------------------------------------------------------------------
# run / demo


@app.command()
@command
def run(
    config: Path = typer.Argument(..., help="Pipeline YAML (workdir, prepare, train, export)."),
    set_: Optional[list[str]] = typer.Option(
        None, "--set", metavar="<str>", help="Override, e.g. train.steps=100."
    ),
    force: Optional[list[str]] = typer.Option(
        None, "--force", metavar="<str>", help="Re-run a stage: prepare|train|export."
    ),
    review: bool = typer.Option(
        False,
        "--review",
        help="Pause after prepare until a person approves the rows (review page on 127.0.0.1:8765).",
    ),
) -> None:
    """Run the whole DAG (prepare -> train -> export) as one Prefect flow run."""
    from finestyle.config import load_pipeline_config

    cfg = load_pipeline_config(config, set_ or [])
    cfg.review = cfg.review or review
    _run_pipeline(cfg, force or [])


@app.command()
@command
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Work folder for the demo run."),
    steps: int = typer.Option(60, help="Training steps."),
    base: str = typer.Option(
        "builtin:tiny-sd", "--base", help="Base model: builtin:tiny-sd, builtin:tiny-sdxl, or any SD/SDXL."
    ),
    force: Optional[list[str]] = typer.Option(
        None, "--force", metavar="<str>", help="Re-run a stage: prepare|train|export."
    ),
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
    random = [m for m in (base, cfg.prepare.captioner) if _random_builtin(m)]
    if random:
        typer.echo(
            f"\nnote: {' and '.join(random)} have random weights: this run proves the pipeline, not the "
            "method. Their captions are word salad and their images coloured noise. The world's trained "
            "models draw real objects: `finestyle world render runs/world/refs --n 3 --size 256 --style "
            "heldout` shows the world, and `finestyle models` lists which trained builtins are installed."
        )


def _prefect_decider(flow_run_id: str) -> Any:
    """`finestyle review --flow-run ID`: Approve / Reject resume that paused Prefect flow run."""
    from flows.review import resume_decider

    return resume_decider(flow_run_id)


FLOW_RUN_DECIDERS["prefect"] = _prefect_decider


def _random_builtin(model: str) -> bool:
    from finestyle.core.models import BUILTINS

    b = BUILTINS.get(model)
    return b is not None and not b.folder


def _run_pipeline(cfg: Any, force: list[str]) -> None:
    bad = set(force) - {"prepare", "train", "export"}
    if bad:
        raise UserError(f"--force: unknown stage {sorted(bad)[0]!r}; use prepare, train or export")
    from finestyle.config import to_dict

    _quiet_prefect_server()
    from flows.pipeline import finestyle_pipeline

    result = finestyle_pipeline(config=to_dict(cfg), force=list(force))
    print_summary("pipeline: done", result.summary)


STAGE_LINE = re.compile(r"^(prepare|train|export|generate|eval|pipeline|compare|sets|skipped)\b")
"""FineStyle's own log lines (each stage's one-line account and skipped inputs)."""


class FinestyleLines(logging.Filter):
    """Quiet mode's console: FineStyle's own lines, and any warning or error; not Prefect's
    per-run bookkeeping (run names, states, the temporary server's start and stop)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError):
            return False  # bad input: the command's own one line ("error: ...") says it, no traceback
        return record.levelno >= logging.WARNING or bool(STAGE_LINE.match(record.getMessage()))


def _quiet_prefect_server() -> None:
    """In the CLI's quiet mode, Prefect's console shows FineStyle's own lines only, without Prefect's
    timestamps and run names (`FinestyleLines`), and mutes `sqlalchemy.pool`, which prints a traceback
    when Prefect's temporary server is stopped while its database connection is being returned (a
    shutdown race, more likely on a busy CPU; the runs are complete and recorded). The config is
    Prefect's own file with those changes, written to the state folder; a PREFECT_LOGGING_SETTINGS_PATH
    you set is left alone, and `--verbose` keeps everything."""
    import importlib.util
    import os

    import yaml

    from finestyle.core.env import state_dir

    if os.environ.get("FINESTYLE_QUIET") != "1" or "PREFECT_LOGGING_SETTINGS_PATH" in os.environ:
        return
    spec = importlib.util.find_spec("prefect")
    default = Path(spec.origin).parent / "logging" / "logging.yml" if spec and spec.origin else None
    if default is None or not default.is_file():
        return
    conf = yaml.safe_load(default.read_text())
    if not isinstance(conf, dict) or "console" not in conf.get("handlers", {}):
        return
    conf.setdefault("loggers", {})["sqlalchemy.pool"] = {"level": "CRITICAL"}
    conf.setdefault("formatters", {})["finestyle"] = {"format": "%(message)s"}
    conf.setdefault("filters", {})["finestyle_lines"] = {"()": "flows.cli.FinestyleLines"}
    console = conf["handlers"]["console"]
    console.update(formatter="finestyle", filters=["finestyle_lines"])
    console.pop("styles", None)
    path = state_dir() / "prefect-logging.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = str(path)


def main() -> None:
    """Console-script entry point: the library's commands plus run and demo."""
    _library_main()


if __name__ == "__main__":
    main()
