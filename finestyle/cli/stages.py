"""`finestyle prepare`, `train` and `export` (with many styles on one swappable export)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from finestyle.cli.base import app, command, print_summary
from finestyle.cli.options import OptionSpec, config_options
from finestyle.config import (
    ExportConfig,
    PrepareConfig,
    TrainConfig,
)
from finestyle.core.errors import UserError

PREPARE = OptionSpec(
    PrepareConfig, arguments=("images",), required=("images", "style", "out"), flags=("force",)
)


@app.command()
@command
@config_options(PREPARE)
def prepare(
    values: dict[str, Any],
    config: Optional[Path] = typer.Option(
        None, help="YAML file (its `prepare:` section); options override it."
    ),
) -> None:
    """Turn reference images into concept crop-caption pairs: a Hugging Face dataset."""
    from finestyle.config import stage_from_sources

    cfg = stage_from_sources(PrepareConfig, "prepare", str(config) if config else None, values)
    from finestyle.prepare.stage import run_prepare

    result = run_prepare(cfg)
    print_summary(
        "prepare: done" + (" (reused)" if result.reused else ""),
        {
            "dataset": result.out,
            "rows": result.rows,
            "images used": result.images_used,
            "skipped": result.skipped,
            "preview": f"{result.out}/preview.png",
        },
    )


TRAIN = OptionSpec(
    TrainConfig,
    arguments=("dataset",),
    required=("dataset", "base", "out"),
    names={"eval_judge": "judge", "sample_prompts": "sample_prompt"},
    repeat=("sample_prompts",),
    flags=("force", "resume"),
)


@app.command()
@command
@config_options(TRAIN)
def train(
    values: dict[str, Any],
    config: Optional[Path] = typer.Option(None, help="YAML file (its `train:` section)."),
) -> None:
    """Fine-tune LoRA adapters on the UNet's cross-attention K/V (FineStyle) from a dataset."""
    from finestyle.config import stage_from_sources

    cfg = stage_from_sources(TrainConfig, "train", str(config) if config else None, values)
    from finestyle.eval.checkpoints import train_with_eval

    r = train_with_eval(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    if r.rank != 0:  # data-parallel worker: rank 0 reports
        return
    summary = {
        "adapter": r.adapter,
        "steps": r.steps,
        "steps/s": f"{r.steps_per_s:.2f}",
        "final loss": f"{r.final_loss:.4f}",
        "trainable params": r.trainable_params,
        "samples": r.samples_dir,
    }
    if r.selected_step is not None:
        summary["selected"] = _selection_line(r, cfg.select)
    print_summary("train: done" + (" (reused)" if r.reused else ""), summary)


def _selection_line(r: Any, mode: str) -> str:
    f = r.selection
    return (
        f"step {r.selected_step} ({mode}): leakage {f['leakage']:+.3f}, style "
        f"{f['style_fidelity']:.3f}, prompt {f['prompt_fidelity']:.3f} ({r.out}/eval.png)"
    )


EXPORT = OptionSpec(
    ExportConfig,
    decls={"fp16": "--fp16/--fp32", "with_base_unet": "--with-base-unet/--no-base-unet"},
    flags=("force",),
    skip=("adapter",),  # repeatable below: one style each with --swappable
    no_default=("base", "out"),
)


@app.command()
@command
@config_options(EXPORT)
def export(
    values: dict[str, Any],
    adapter: Optional[list[Path]] = typer.Option(
        None,
        "--adapter",
        metavar="<path>",
        help="Adapter folder (RUN/adapter), or 'none' to export the base model as it is; "
        "repeatable with --swappable (one style each).",
    ),
    swappable: bool = typer.Option(
        False, "--swappable", help="One shared UNet with K/V inputs; each --adapter becomes a style."
    ),
    name: Optional[list[str]] = typer.Option(
        None,
        "--name",
        metavar="<str>",
        help="Style name per --adapter (or --add-style) [the style text as a slug].",
    ),
    add_style: Optional[Path] = typer.Option(
        None, "--add-style", help="Add this adapter as a style to the swappable export --to DIR."
    ),
    remove_style: Optional[str] = typer.Option(
        None, "--remove-style", help="Remove the named style from the swappable export --to DIR."
    ),
    to: Optional[Path] = typer.Option(
        None, "--to", help="The export --add-style/--remove-style (swappable) or --quantize changes."
    ),
    quantize: Optional[str] = typer.Option(
        None,
        "--quantize",
        help="int8: add an NNCF-quantized int8 UNet for OpenVINO to the export --to DIR, with its "
        "quality guard (`--runtime openvino --dtype int8`).",
    ),
    calibration_prompts: int = typer.Option(
        16,
        "--calibration-prompts",
        help="--quantize: prompts whose denoising steps calibrate int8 (16 x 20 steps: 320 UNet calls).",
    ),
    calibration_steps: int = typer.Option(
        20, "--calibration-steps", help="--quantize: denoising steps per prompt (and of the guard's images)."
    ),
    quantize_mode: str = typer.Option(
        "hybrid",
        "--quantize-mode",
        help="--quantize: hybrid (int8 weights only on the matrix products with weights; closer to fp32, "
        "measured) or full (int8 weights and activations of convolutions and matrix products).",
    ),
    config: Optional[Path] = typer.Option(None, help="YAML file (its `export:` section)."),
) -> None:
    """Merge the adapter into the UNet, export ONNX (or TensorRT) and prove parity."""
    from finestyle.config import stage_from_sources

    adapters = [str(a) for a in adapter or []]
    base, out, lora_scale = values["base"], values["out"], values["lora_scale"]
    if add_style or remove_style:
        _edit_styles(add_style, remove_style, to, name, lora_scale)
        return
    if quantize:
        _quantize(quantize, to, calibration_prompts, calibration_steps, quantize_mode)
        return
    if not base or not out:
        raise UserError(
            "export needs --base MODEL and --out DIR (or --add-style/--remove-style with --to DIR)"
        )
    if swappable:
        values["adapter"] = None
        cfg = stage_from_sources(ExportConfig, "export", str(config) if config else None, values)
        _export_swappable(cfg, adapters, name or [])
        return
    if len(adapters) > 1:
        raise UserError("several --adapter values need --swappable (one style each)")
    one = adapters[0] if adapters else None
    values["adapter"] = ("" if one.lower() == "none" else one) if one else None
    cfg = stage_from_sources(ExportConfig, "export", str(config) if config else None, values)
    from finestyle.export.steps import run_export

    r = run_export(cfg)
    print_summary(
        "export: done" + (" (reused)" if r.reused else ""),
        {
            "export": r.out,
            "manifest": f"{r.out}/manifest.json",
            **{f"parity {k}": v for k, v in r.parity.items()},
        },
    )


def _export_swappable(cfg: ExportConfig, adapters: list[str], names: list[str]) -> None:
    from finestyle.export.swappable import run_swappable_export

    if not adapters or any(a.lower() == "none" for a in adapters):
        raise UserError("--swappable needs at least one --adapter RUN/adapter (the base is always a style)")
    for a in adapters:
        if not Path(a).is_dir():
            raise UserError(f"adapter folder {a!r} does not exist; pass RUN/adapter from `finestyle train`")
    r = run_swappable_export(
        cfg.base,
        adapters,
        names,
        cfg.out,
        cfg.lora_scale,
        parity_steps=cfg.parity_steps,
        fp16=cfg.fp16,
        trt=cfg if cfg.format == "tensorrt" else None,
        check_openvino=cfg.check_openvino,
    )
    print_summary(
        "export: done (swappable)",
        {
            "export": r.out,
            "styles": ", ".join(r.styles),
            **{f"parity {k}": v for k, v in r.parity.items()},
        },
    )


def _quantize(mode: str, to: Path | None, prompts: int, steps: int, int8_mode: str) -> None:
    from finestyle.export.quantize import quantize_export

    if mode != "int8":
        raise UserError(f"--quantize {mode!r}: int8 is the one mode")
    if not to:
        raise UserError("--quantize int8 needs --to EXPORT_DIR (an export from `finestyle export`)")
    from finestyle.artifacts.manifest import verify_export
    from finestyle.world import int8

    manifest = verify_export(to)
    world = int8.applies(manifest)  # the world's prompts calibrate, and its judge guards
    r = quantize_export(
        str(to),
        prompts=int8.calibration_prompts(manifest, prompts) if world else prompts,
        steps=steps,
        guard_steps=steps,
        mode=int8_mode,
        judged=int8.judged_guard if world else None,
    )
    g = r["guard"]
    j = g.get("judged")
    print_summary(
        "export: int8 UNet " + ("added" if g["pass"] else "added, but its guard FAILED (unusable)"),
        {
            "export": str(to),
            "int8 unet": f"{to}/openvino/unet_int8/model.xml ({r['mode']}: {r['fake_quantize_ops']} "
            "quantized ops)",
            "calibration": f"{r['calibration']['unet_calls']} UNet calls, {r['seconds']} s",
            "guard": f"mean image diff {g['mean_abs_diff']:.2e} (<= {g['mean_atol']}) on {g['images']} images",
            **(
                {
                    "judged guard": f"int8 - {j['reference']}: prompt fidelity {j['delta']['prompt']:+.3f}, "
                    f"style fidelity {j['delta']['style']:+.3f} (within {j['atol']}) on {j['images']} images"
                }
                if j
                else {}
            ),
        },
    )


def _edit_styles(
    add: Path | None, remove: str | None, to: Path | None, names: list[str] | None, lora_scale: float | None
) -> None:
    from finestyle.export.swappable import add_style, remove_style

    if not to:
        raise UserError("--add-style / --remove-style need --to EXPORT_DIR (a swappable export)")
    if add and remove:
        raise UserError("give --add-style or --remove-style, not both")
    if add:
        if not add.is_dir():
            raise UserError(
                f"adapter folder {str(add)!r} does not exist; pass RUN/adapter from `finestyle train`"
            )
        if names and len(names) > 1:
            raise UserError("--add-style takes one --name")
        r = add_style(
            str(to), str(add), names[0] if names else None, lora_scale if lora_scale is not None else 1.0
        )
        print_summary(
            "export: style added", {"export": r.out, "added": r.added, "styles": ", ".join(r.styles)}
        )
    else:
        r = remove_style(str(to), remove)
        print_summary(
            "export: style removed",
            {"export": r.out, "removed": r.removed, "styles": ", ".join(r.styles)},
        )
