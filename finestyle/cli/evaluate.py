"""`finestyle eval`: style, prompt and leakage of an export, and the FineStyle-against-plain comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from finestyle.cli.base import app, command, print_summary
from finestyle.cli.options import OptionSpec, config_options
from finestyle.config import (
    EvalConfig,
)
from finestyle.core.errors import UserError

EVAL = OptionSpec(EvalConfig, arguments=("model",), required=("out",), no_default=("model", "references"))


@app.command("eval")
@command
@config_options(EVAL)
def eval_cmd(
    values: dict[str, Any],
    compare: bool = typer.Option(
        False, "--compare", help="Train and compare FineStyle against plain style tuning."
    ),
    base: Optional[str] = typer.Option(None, help="--compare: the base model."),
    captioner: str = typer.Option("builtin:tiny-blip", help="--compare: captioner for the concept crops."),
    train_steps: int = typer.Option(300, help="--compare: training steps per variant."),
    rank: int = typer.Option(8, help="--compare: LoRA rank."),
    lr: float = typer.Option(1e-3, help="--compare: learning rate."),
    resolution: int = typer.Option(64, help="--compare: training resolution."),
    variants: Optional[str] = typer.Option(
        None, help="--compare: comma-separated subset of finestyle,plain,attention_attn,none_kv."
    ),
    sets: int = typer.Option(
        0, help="--compare: N world reference sets drawn at random (no --references); gives the verdict."
    ),
    calibration_sets: int = typer.Option(4, help="--compare --sets: calibration sets (positive control)."),
    reference_size: int = typer.Option(256, help="--compare --sets: reference images' side in px."),
) -> None:
    """Score style fidelity, prompt fidelity and content leakage (tuned minus base); --compare runs the ablation."""
    from finestyle.config import stage_from_sources

    model, style, references, out = (
        values["model"],
        values["style"],
        values["references"],
        Path(values["out"]),
    )
    values["model"] = model or ""  # --compare trains its own models
    if sets and not compare:
        raise UserError(
            "--sets N belongs to --compare (FineStyle against plain tuning over N reference sets)"
        )
    if sets and references:
        raise UserError("--compare --sets draws its own world reference sets; drop --references")
    if not references and not sets:
        raise UserError(
            "finestyle eval: give --references (a prepared dataset; with --compare, an images folder)"
        )
    if sets:
        from finestyle.world.scene import HELDOUT_STYLE

        style = style or HELDOUT_STYLE
        values.update(style=style, references="")
    ecfg = stage_from_sources(EvalConfig, "eval", None, values)
    if compare:
        from finestyle.eval.compare import VARIANTS, CompareSettings, run_compare, run_sets

        if not base or not style:
            raise UserError("--compare needs --base MODEL and --style TEXT (and --references IMAGES_FOLDER)")
        settings = CompareSettings(
            images=references or "",
            style=style,
            base=base,
            captioner=captioner,
            steps=train_steps,
            rank=rank,
            lr=lr,
            resolution=resolution,
            variants=tuple(v.strip() for v in variants.split(",")) if variants else tuple(VARIANTS),
        )
        if sets:
            if sets < 2 or calibration_sets < 1:
                raise UserError("--sets needs 2 or more test sets and --calibration-sets 1 or more")
            run_sets(settings, ecfg, sets, calibration_sets, reference_size)
        else:
            run_compare(settings, ecfg)
    else:
        if not model:
            raise UserError("finestyle eval: give MODEL (an export folder, or a base model with --adapter)")
        from finestyle.eval.run import run_eval

        run_eval(ecfg)
    typer.echo("")
    typer.echo((out / "report.md").read_text().rstrip())
    print_summary(
        "eval: done",
        {"report": out / "report.json", "table": out / "report.md", "grid": out / "grid.png"}
        | ({"trade-off": out / "guidance.png"} if (out / "guidance.png").exists() else {}),
    )
