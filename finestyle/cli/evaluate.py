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
    study: bool = typer.Option(
        False,
        "--study",
        help="--compare: the recipe study: each data-recipe knob against today's on the calibration sets, "
        "and the recipe its fixed rule chooses (no test sets).",
    ),
    knobs: Optional[str] = typer.Option(
        None, help="--study: the knobs to run (today's recipe always runs); default: all. (comma-separated)"
    ),
    concept_share: Optional[str] = typer.Option(
        None,
        help="--compare: FineStyle's crops: a concept fills at most this share of its crop's side (several: one crop per value). (comma-separated)",
    ),
    max_upscale: Optional[float] = typer.Option(
        None, help="--compare: FineStyle's crops are enlarged at most this factor (0: no limit)."
    ),
    name_covered: Optional[float] = typer.Option(
        None, help="--compare: FineStyle's crop texts name every concept with this share of its box inside."
    ),
    whole_image_weight: Optional[float] = typer.Option(
        None, help="--compare: FineStyle draws each whole reference image this many times per epoch."
    ),
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
    check_modes(compare, sets, study, bool(knobs), bool(references))
    if sets or study:
        from finestyle.world.scene import HELDOUT_STYLE

        style = style or HELDOUT_STYLE
        values.update(style=style, references="")
    ecfg = stage_from_sources(EvalConfig, "eval", None, values)
    if compare:
        from finestyle.eval.compare import VARIANTS, CompareSettings

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
            recipe=recipe_options(concept_share, max_upscale, name_covered, whole_image_weight),
        )
        run_comparison(settings, ecfg, sets, calibration_sets, reference_size, study, knobs)
    else:
        if not model:
            raise UserError("finestyle eval: give MODEL (an export folder, or a base model with --adapter)")
        from finestyle.eval.run import run_eval

        run_eval(ecfg)
    typer.echo("")
    typer.echo((out / "report.md").read_text().rstrip())
    print_summary(
        "eval: done",
        {"report": out / "report.json", "table": out / "report.md"}
        | {
            k: out / f for k, f in (("grid", "grid.png"), ("trade-off", "guidance.png")) if (out / f).exists()
        },
    )


def recipe_options(
    concept_share: str | None,
    max_upscale: float | None,
    name_covered: float | None,
    whole_image_weight: float | None,
) -> dict[str, Any]:
    """`--compare`'s data-recipe options as `CompareSettings.recipe` (only those given), checked as the
    prepare and train stages check them."""
    from finestyle.config import PrepareConfig, TrainConfig

    recipe: dict[str, Any] = {}
    if concept_share is not None:
        try:
            recipe["concept_share"] = [float(v) for v in concept_share.split(",") if v.strip()]
        except ValueError as e:
            raise UserError(f"--concept-share {concept_share!r}: give numbers, e.g. 0.6 or 0.6,0.3") from e
    if max_upscale is not None:
        recipe["max_upscale"] = max_upscale
    if name_covered is not None:
        recipe["name_covered"] = name_covered
    PrepareConfig(images=["x"], style="x", out="x", **recipe)  # raises the stage's own error
    if whole_image_weight is not None:
        TrainConfig(dataset="x", base="x", out="x", whole_image_weight=whole_image_weight)
        recipe["whole_image_weight"] = whole_image_weight
    return recipe


def check_modes(compare: bool, sets: int, study: bool, knobs: bool, references: bool) -> None:
    """`eval`'s modes (one export; --compare on references; --compare --sets; --compare --study) and
    the flags each takes: a wrong mix is one line."""
    refusals = (
        (knobs and not study, "--knobs belongs to --compare --study"),
        (study and not compare, "--study belongs to --compare (the recipe study on world calibration sets)"),
        (
            study and sets,
            "--study runs on the calibration sets only; drop --sets (the verdict runs the test sets)",
        ),
        (study and references, "--compare --study draws its own world reference sets; drop --references"),
        (
            sets and not compare,
            "--sets N belongs to --compare (FineStyle against plain tuning over N reference sets)",
        ),
        (sets and references, "--compare --sets draws its own world reference sets; drop --references"),
        (
            not references and not sets and not study,
            "finestyle eval: give --references (a prepared dataset; with --compare, an images folder)",
        ),
    )
    for refused, why in refusals:
        if refused:
            raise UserError(why)


def run_comparison(
    settings: Any,
    ecfg: EvalConfig,
    sets: int,
    calibration_sets: int,
    reference_size: int,
    study: bool,
    knobs: str | None,
) -> None:
    """--compare on one set of references, over world sets (the verdict), or the recipe study."""
    from finestyle.eval.compare import run_compare, run_sets

    if study:
        from finestyle.eval.study import run_study, select_knobs

        if calibration_sets < 2:
            raise UserError("--study needs --calibration-sets 2 or more (its intervals are over the sets)")
        if settings.recipe:
            raise UserError("--study sets the recipe knob by knob; drop the recipe options")
        run_study(settings, ecfg, calibration_sets, reference_size, knobs=select_knobs(knobs))
    elif sets:
        if sets < 2 or calibration_sets < 1:
            raise UserError("--sets needs 2 or more test sets and --calibration-sets 1 or more")
        run_sets(settings, ecfg, sets, calibration_sets, reference_size)
    else:
        run_compare(settings, ecfg)
