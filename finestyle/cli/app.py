"""The `finestyle` command. Thin: parse options into a config, call one stage function, report.

Exit codes: 0 success (bad inputs skipped and reported still count), 2 unusable input or arguments
(one line on stderr, no traceback), 1 internal failure.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from finestyle.cli.options import OptionSpec, config_options
from finestyle.config import (
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PrepareConfig,
    ServeConfig,
    TrainConfig,
)
from finestyle.core.errors import UserError, VerificationError


def _usage_name(self: Any) -> str:
    """Click's usage convention (typer's plain help writes {name}): NAME required, [NAME] optional."""
    name = self.display_name_raw.upper()
    return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")


if hasattr(typer.core.TyperArgument, "_usage_display_name"):
    typer.core.TyperArgument._usage_display_name = _usage_name
if hasattr(typer.core.TyperArgument, "display_type"):
    _typer_display_type = typer.core.TyperArgument.display_type

    def _display_type(self: Any, ctx: Any) -> str:
        """A repeated value shows its item's type (<str>, not <list[str]>)."""
        shown = _typer_display_type(self, ctx)
        return shown.replace("<list[", "<").replace("]>", ">") if shown.startswith("<list[") else shown

    typer.core.TyperArgument.display_type = _display_type

app = typer.Typer(
    name="finestyle",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: wraps at any width, never cuts a flag name
    help="FineStyle: concept-oriented style personalization for Stable Diffusion, from a few "
    "reference images to a validated ONNX/TensorRT export and an inference server.",
)
models_app = typer.Typer(
    rich_markup_mode=None,
    no_args_is_help=False,
    invoke_without_command=True,
    help="List the builtin models, or write one as a local folder.",
)
bench_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Benchmarks that print a ratio against a baseline."
)
world_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="The procedural world: render scenes, train and check its builtin models.",
)
app.add_typer(models_app, name="models")
app.add_typer(world_app, name="world")
app.add_typer(bench_app, name="bench")


@app.callback()
def _options(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        help="Also show the third-party warnings and progress bars that commands hide as benign.",
    ),
) -> None:
    """Options of every command (give them before the command's name)."""
    from finestyle.core.env import quiet_output

    quiet_output(verbose)


def _fail(msg: str, code: int) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map our exceptions onto the exit-code contract."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from finestyle.core.env import configure_environment

        configure_environment()
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, 2)
        except VerificationError as exc:
            _fail(f"verification failed: {exc}", 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # a full disk is the user's to fix: one line, exit 2
            from finestyle.core.fs import disk_full, disk_full_message

            full = disk_full(exc)
            if full is None:
                raise
            _fail(disk_full_message(full), 2)

    return wrapper


def print_summary(title: str, lines: dict[str, Any]) -> None:
    typer.echo(f"\n{title}")
    width = max((len(k) for k in lines), default=0)
    for k, v in lines.items():
        typer.echo(f"  {k.ljust(width)}  {v}")


# ------------------------------------------------------------------------------------------------
# prepare


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


# ------------------------------------------------------------------------------------------------
# train


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


# ------------------------------------------------------------------------------------------------
# export


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
        None, "--to", help="The swappable export --add-style/--remove-style changes."
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


# ------------------------------------------------------------------------------------------------
# generate / serve


GENERATE = OptionSpec(GenerateConfig, arguments=("model", "prompt"), required=("model", "prompt", "out"))


@app.command()
@command
@config_options(GENERATE)
def generate(values: dict[str, Any]) -> None:
    """Generate images from an export (onnxruntime/TensorRT) or a torch model."""
    from finestyle.config import stage_from_sources

    cfg = stage_from_sources(GenerateConfig, "generate", None, values)
    from finestyle.runtime.generate import run_generate

    r = run_generate(cfg)
    print_summary(
        "generate: done",
        {"images": ", ".join(r.files), "runtime": r.runtime, "seconds": f"{r.seconds:.2f}"},
    )


@app.command()
@command
def concepts(export_dir: Path = typer.Argument(..., help="Export folder.")) -> None:
    """List the style and the concept words the export's adapter learned (add or drop them in prompts)."""
    from finestyle.runtime.generate import export_concepts

    c = export_concepts(export_dir)
    if "styles" in c:  # a swappable export: each style's own words
        for name, v in c["styles"].items():
            typer.echo(f"{name}: style: {v['style'] or '-'}; concepts: " + (", ".join(v["concepts"]) or "-"))
        return
    typer.echo(f"style: {c['style'] or '-'}")
    typer.echo("concepts: " + (", ".join(c["concepts"]) or "-"))


SERVE = OptionSpec(ServeConfig, arguments=("export",), required=("export",))


@app.command()
@command
@config_options(SERVE)
def serve(
    values: dict[str, Any],
    config: Optional[Path] = typer.Option(None, help="YAML file (its `serve:` section)."),
) -> None:
    """Serve an export over HTTP: POST /v1/generate, /healthz, /readyz, /v1/model, /metrics."""
    from finestyle.config import stage_from_sources
    from finestyle.serve.app import run_config

    run_config(stage_from_sources(ServeConfig, "serve", str(config) if config else None, values))


# ------------------------------------------------------------------------------------------------
# models


@models_app.callback()
def models_list(ctx: typer.Context) -> None:
    """List the builtin models."""
    if ctx.invoked_subcommand is not None:
        return
    from finestyle.core.models import BUILTINS

    for b in BUILTINS.values():
        typer.echo(f"{b.name:26s} {b.kind:14s} {b.description}")


@models_app.command("save")
@command
def models_save(
    name: str = typer.Argument(..., help="Builtin name, e.g. builtin:tiny-sd."),
    out: Path = typer.Argument(..., help="Folder to write (diffusers/transformers layout)."),
) -> None:
    """Write a builtin as an ordinary local model folder (safetensors)."""
    from finestyle.core.models import save_builtin

    path = save_builtin(name, out)
    typer.echo(f"wrote {name} to {path}")


# ------------------------------------------------------------------------------------------------
# eval


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


# ------------------------------------------------------------------------------------------------
# bench


@bench_app.command("caption")
@command
def bench_caption(
    captioner: str = typer.Option("builtin:blip-base-random", help="Captioner to measure."),
    images: int = typer.Option(16, help="Number of images."),
    batch_size: int = typer.Option(8, help="Batch size of the project's path."),
    max_new_tokens: int = typer.Option(20, help="Tokens generated per caption."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Captioning images/s: the project's batched path vs a one-at-a-time generate loop."""
    from finestyle.bench.suite import bench_caption as run

    r = run(captioner, images, batch_size, max_new_tokens)
    typer.echo(json.dumps(r, indent=2))
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


@bench_app.command("train")
@command
def bench_train_cmd(
    base: str = typer.Option("builtin:sd15-random", help="Model to train."),
    resolution: int = typer.Option(256, help="Training resolution."),
    steps: int = typer.Option(3, help="Measured steps per variant (after warm-up)."),
    warmup: int = typer.Option(1, help="Warm-up steps per variant."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto (CUDA: bf16 variants, peak VRAM, MFU)."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Checkpoint the UNet's activations in every variant."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Trainer steps/s + peak memory vs a baseline that re-encodes VAE latents and text every step.

    SDXL bases run the bf16 variants only (their fp32 weights alone are 14 GB)."""
    from finestyle.bench.suite import bench_train

    r = bench_train(
        base, resolution, steps, warmup, device=device, gradient_checkpointing=gradient_checkpointing
    )
    typer.echo(
        f"{r['base']} at {r['resolution']} px on {r['gpu'] or r['device']} ({r['cpu']})"
        + (", gradient checkpointing" if gradient_checkpointing else "")
    )
    for name, v in r["results"].items():
        mem = (
            f"peak VRAM {v['peak_vram_gib']:.2f} GiB"
            if "peak_vram_gib" in v
            else f"peak RSS {v['peak_rss_gib']:.2f} GiB"
        )
        mfu = f"  MFU {100 * v['mfu']:.1f}%" if v.get("mfu") is not None else ""
        typer.echo(
            f"{name:14s} {v['steps_per_s']:.3f} steps/s  {v['seconds_per_step']:.3f} s/step  {mem}  "
            f"UNet {v['unet_tflops']:.2f} TFLOP/s{mfu}  ratio {v['ratio_vs_baseline']:.2f}x"
        )
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


@bench_app.command("stages")
@command
def bench_stages_cmd(
    base: str = typer.Option("builtin:sdxl-random", help="Text-to-image model."),
    resolution: int = typer.Option(512, help="Training resolution."),
    steps: int = typer.Option(2, help="Training steps (bf16)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Peak RSS and time of prepare, a few bf16 training steps and the export of every component but
    the UNet, each in its own process, next to the memory guard's estimates."""
    from finestyle.bench.suite import bench_stages

    r = bench_stages(base, resolution, steps)
    host = f"{r['host_memory_gib']:.1f} GiB" if r["host_memory_gib"] else "unknown"
    typer.echo(f"{r['base']} on {r['cpu']}, host memory {host}; parameters (M): {r['params_millions']}")
    for name, v in r["stages"].items():
        est = r["estimates_gib"].get(name if name != "export-parts" else "", None)
        guard = f"  (guard's estimate {est:.1f} GiB)" if est else ""
        typer.echo(f"{name:13s} {v['seconds']:8.1f} s  peak RSS {v['peak_rss_gib']:6.2f} GiB{guard}")
    if r["estimates_gib"]:
        typer.echo(f"full export: the guard's estimate {r['estimates_gib']['export']:.1f} GiB")
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


@bench_app.command("export")
@command
def bench_export_cmd(
    model: list[str] = typer.Option(["builtin:tiny-sd", "builtin:sd15-random"], help="Models (repeatable)."),
    latent: int = typer.Option(32, help="Latent side (32 = 256 px)."),
    batch: int = typer.Option(2, help="UNet batch (2 = one image with guidance)."),
    iters: int = typer.Option(3, help="Timed iterations per variant."),
    image_size: Optional[int] = typer.Option(
        None, help="CPU: side of the whole image timed on the fastest runtime [latent x 8]."
    ),
    device: str = typer.Option(
        "cpu", help="cpu, cuda or auto. On CUDA: fp16 eager vs ORT CUDA (+ TensorRT)."
    ),
    bound: bool = typer.Option(
        False, help="On CPU too: the device path (eager vs ORT with IO binding) instead of the CPU analysis."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """One UNet step: PyTorch eager vs onnxruntime (the export), with the fp32 peak share and bf16."""
    from finestyle.bench.suite import bench_unet_step, bench_unet_step_device
    from finestyle.core.models import pick_device

    dev = str(pick_device(device))
    allr = []
    if dev != "cpu" or bound:
        for m in model:
            r = bench_unet_step_device(m, latent, batch, iters, dev)
            allr.append(r)
            line = f"{m} on {r['gpu'] or dev} ({r['dtype']}): {r['gflop_per_step']:.1f} GFLOP/step | "
            line += f"torch eager {r['torch_eager_s'] * 1e3:.2f} ms"
            for key, label in (("ort", "ORT"), ("trt", "ORT TensorRT")):
                h = r[key]
                if h["status"] == "ran":
                    line += (
                        f" | {label} {h['step_s'] * 1e3:.2f} ms ({r['torch_eager_s'] / h['step_s']:.2f}x, "
                        f"session {h['session_and_first_run_s']:.1f} s, max diff {h['max_abs_diff_vs_torch']:.1e})"
                    )
                else:
                    line += f" | {label} {h['status']}"
            typer.echo(line)
        if json_out:
            json_out.write_text(json.dumps(allr, indent=2))
        return
    for m in model:
        r = bench_unet_step(m, latent, batch, iters, image_size)
        allr.append(r)
        typer.echo(
            f"{m}: one UNet step, batch {batch}, latent {latent}x{latent}, {r['gflop_per_step']:.1f} GFLOP | "
            f"{r['cpu']} | matmul peaks: fp32 {r['matmul_fp32_gflops']:.0f} GFLOP/s, bf16 "
            + (
                f"{r['matmul_bf16_gflops']:.0f} GFLOP/s"
                if r["matmul_bf16_gflops"]
                else "none (no bf16 units: bf16 rows run a slow fallback)"
            )
        )
        typer.echo(
            f"  {'runtime':<46} {'ms':>9} {'vs eager':>9} {'GFLOP/s':>8} {'of peak':>12} {'rel diff':>9}"
        )
        for row in r["runtimes"]:
            rel = f"{row['rel_diff']:.1e}" if row["rel_diff"] is not None else "-"
            typer.echo(
                f"  {row['runtime']:<46} {row['ms']:>9.1f} {row['vs_eager_fp32']:>8.2f}x "
                f"{row['gflops']:>8.0f} "
                + (f"{100 * row['share_of_peak']:>4.0f}%" if row["share_of_peak"] is not None else "    -")
                + f" {row['precision']:<5}"
                f"  {rel:>9}"
            )
        if r["openvino"] != "ran":
            typer.echo("  OpenVINO: not installed (pip install 'finestyle[cpu]')")
        else:
            t = {row["key"]: row["ms"] for row in r["runtimes"]}
            ovk = "openvino_bf16_s" if "openvino_bf16_s" in t else "openvino_fp32_s"
            typer.echo(
                f"  OpenVINO {ovk.split('_')[1]} vs PyTorch bf16: {t['torch_bf16_weights_s'] / t[ovk]:.2f}x | "
                f"vs onnxruntime fp32: {t['ort_fp32_s'] / t[ovk]:.2f}x"
            )
        w = r["whole_image"]
        typer.echo(
            f"  whole image ({w['size']} px, {w['steps']} steps, text encoder + UNet + VAE decode) on the "
            f"fastest runtime, {w['runtime']}: {w['seconds']:.2f} s"
        )
        b = r["ort_breakdown"]
        typer.echo(
            f"  ORT fp32 by op: conv {b['conv_gflop']:.1f} GFLOP in {b['conv_ms']:.0f} ms "
            f"({100 * b['conv_share_of_peak']:.0f}% of peak) | matmul {b['matmul_gflop']:.1f} GFLOP in "
            f"{b['matmul_ms']:.0f} ms ({100 * b['matmul_share_of_peak']:.0f}%) | other ops "
            f"{b['other_ops_ms']:.0f} ms | ceiling with conv+matmul at 100% of peak: "
            f"{100 * b['ceiling_share_of_peak']:.0f}%"
        )
    if json_out:
        json_out.write_text(json.dumps(allr, indent=2))


@bench_app.command("serve")
@command
def bench_serve_cmd(
    export_dir: Optional[str] = typer.Option(
        None, "--export", help="Export to serve [a fresh builtin export]."
    ),
    requests: int = typer.Option(64, help="Requests per concurrency level (bounded)."),
    steps: int = typer.Option(4, help="Denoising steps per request."),
    time_limit: float = typer.Option(60.0, help="Seconds per level at most."),
    size: Optional[int] = typer.Option(None, help="Image side in pixels [the model's native size]."),
    max_wait_ms: float = typer.Option(60.0, help="Server's batching wait (--max-wait-ms)."),
    runtime: str = typer.Option("onnxruntime", help="Server's runtime: onnxruntime | openvino | torch."),
    styles: int = typer.Option(
        0, help="N > 0: many styles, one server (N adapters as one swappable export vs merged)."
    ),
    model: str = typer.Option("builtin:tiny-sd", help="--styles: the base model."),
    concurrency: int = typer.Option(8, help="--styles: clients."),
    memory_only: bool = typer.Option(
        False, "--memory-only", help="--styles: disk and server memory only (no timings: for large models)."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Server under load on 127.0.0.1: concurrency 1/2/4/8, batching on vs off, then an overload flood."""
    from finestyle.bench.suite import bench_serve, bench_styles

    if styles > 0:
        r = bench_styles(styles, model, requests, steps, concurrency, time_limit, memory_only=memory_only)
        _print_styles(r, json_out)
        return
    r = bench_serve(
        export_dir,
        requests_per_level=requests,
        steps=steps,
        time_limit=time_limit,
        size=size,
        max_wait_ms=max_wait_ms,
        runtime=runtime,
    )
    typer.echo("batching  conc  ok/req   errors  p50 s   p95 s   p99 s   img/s")
    for mode, rows in r["levels"].items():
        for x in rows:
            typer.echo(
                f"{mode:8s}  {x['concurrency']:4d}  {x['ok']:3d}/{x['requests']:<3d}  {x['errors']:6d}  "
                f"{x['p50_s']:.3f}  {x['p95_s']:.3f}  {x['p99_s']:.3f}  {x['img_per_s']:.2f}"
            )
    ratios = [
        f"c={on['concurrency']}: {on['img_per_s'] / off['img_per_s']:.2f}x"
        for on, off in zip(r["levels"]["on"], r["levels"]["off"], strict=True)
        if off["img_per_s"]
    ]
    typer.echo("batching on/off images/s: " + ", ".join(ratios))
    typer.echo(
        f"batching throughput ratio at the highest concurrency: {r['batching_ratio_at_max_concurrency']:.2f}x"
    )
    typer.echo(f"overload (queue 4, 24 concurrent): {r['overload']}")
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


def _print_styles(r: dict[str, Any], json_out: Path | None) -> None:
    mb, gb = 1e6, 2**30
    typer.echo(f"{r['model']}, {r['styles']} styles | {r['cpu']}")
    if "unet_step_kv_s" in r:
        typer.echo(
            f"  UNet step, batch 2 (interleaved medians): merged {r['unet_step_merged_s'] * 1e3:.2f} ms | "
            f"K/V inputs {r['unet_step_kv_s'] * 1e3:.2f} ms = {r['kv_step_vs_merged']:.3f}x the merged step "
            f"(goal <= 1.05x) | K/V projection once per request {r['project_kv_per_request_s'] * 1e3:.2f} ms"
        )
        s1, s2 = r["serve_single_style"]
        m = r["serve_mixed_styles"]
        typer.echo(
            f"  serving at concurrency {m['concurrency']}: one style {s1['img_per_s']:.2f} / {s2['img_per_s']:.2f} img/s "
            f"(before/after) | styles mixed {m['img_per_s']:.2f} img/s = {r['mixed_vs_single_throughput']:.2f}x "
            f"(goal >= 0.9x) | errors {s1['errors'] + s2['errors'] + m['errors']}"
        )
    typer.echo(
        f"  disk: swappable with {r['styles']} styles {r['disk_swappable_bytes'] / mb:.1f} MB (one style "
        f"{r['disk_one_style_bytes'] / 1e3:.1f} kB) | {r['styles']} merged exports "
        f"{r['disk_n_merged_bytes_computed'] / mb:.1f} MB (computed: one measured x {r['styles']})"
    )
    sw, one = r["memory_swappable_server"], r["memory_one_merged_server"]
    typer.echo(
        f"  server memory after one request (resident / peak): swappable with {r['styles']} styles "
        f"{sw['rss_bytes'] / gb:.2f} / {sw['peak_rss_bytes'] / gb:.2f} GiB | one merged export "
        f"{one['rss_bytes'] / gb:.2f} / {one['peak_rss_bytes'] / gb:.2f} GiB | {r['styles']} merged servers "
        f"{r['memory_n_merged_servers_rss_bytes_computed'] / gb:.2f} GiB resident (computed: one x {r['styles']})"
    )
    if json_out:
        json_out.write_text(json.dumps(r, indent=2))


# ------------------------------------------------------------------------------------------------
# world


@world_app.command("render")
@command
def world_render(
    out: Path = typer.Argument(..., help="Folder for the PNGs and labels.jsonl (published atomically)."),
    n: int = typer.Option(16, "--n", help="Number of scenes."),
    size: int = typer.Option(64, "--size", help="Image side in pixels (>= 32)."),
    style: Optional[str] = typer.Option(
        None, "--style", help="A style name, or `heldout` [default: each scene's own]."
    ),
    seed: int = typer.Option(0, "--seed", help="First scene seed; scene i uses seed + i."),
) -> None:
    """Draw world scenes with their truth: caption, objects with boxes, background, style."""
    from finestyle.world.data import render_folder

    path = render_folder(out, n, size, style, seed)
    typer.echo(f"wrote {n} scenes ({size} px) and labels.jsonl to {path}")


@world_app.command("train")
@command
def world_train(
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, model/ and report.json (resumes)."),
    model: str = typer.Option("sd", "--model", help="vae | sd | blip | judge (sd needs a trained vae)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    n_train: Optional[int] = typer.Option(None, help="Distinct training renders."),
    threads: Optional[int] = typer.Option(None, help="torch threads [1]."),
    vae: Optional[str] = typer.Option(None, help="sd, judge: trained VAE folder [OUT/../vae/model]."),
    device: Optional[str] = typer.Option(None, help="cuda | cpu | auto [auto: cuda when present]."),
    init: Optional[str] = typer.Option(
        None, help="Saved model folder to continue from (weights only), e.g. an installed builtin's."
    ),
) -> None:
    """Train one of the world's models from a seed: progress, checkpoints, resume."""
    from finestyle.world.train import DEFAULTS, WorldTrainConfig, train_world_model

    if model not in DEFAULTS:
        raise UserError(f"--model: {model!r} is not one of {', '.join(DEFAULTS)}")
    cfg = WorldTrainConfig(model=model, out=str(out), **DEFAULTS[model])
    given = dict(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        n_train=n_train,
        threads=threads,
        vae=vae,
        device=device,
        init=init,
    )
    for k, v in given.items():
        if v is not None:
            setattr(cfg, k, v)
    path = train_world_model(cfg, log=typer.echo)
    typer.echo(f"trained {model}: {path}")


@world_app.command("install")
@command
def world_install(
    runs: list[Path] = typer.Argument(
        ..., help="The run folder of `world train` (then any runs it builds on)."
    ),
    model: str = typer.Option(..., "--model", help="sd | blip | judge."),
    gates: Optional[Path] = typer.Option(
        None, help="`world check --json` output to print in the model card."
    ),
) -> None:
    """Install a trained world model as its builtin (fp16 safetensors, model card, SHA256SUMS)."""
    from finestyle.world.publish import install

    typer.echo(f"installed {model} to {install(runs, model, gates)}")


@world_app.command("check")
@command
def world_check(
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the gates as JSON."),
    sd: str = typer.Option("builtin:world-sd", help="Text-to-image model to check."),
    blip: str = typer.Option("builtin:world-blip", help="Captioner to check."),
    judge: str = typer.Option("builtin:world-judge", help="Judge to check and to judge with."),
    vae: str = typer.Option("", help="VAE folder for the vae gates [world-sd's own]."),
    only: Optional[list[str]] = typer.Option(
        None, "--only", metavar="<str>", help="judge | sd | blip | localise | adapter | vae (repeatable)."
    ),
    scale: float = typer.Option(
        1.0, help="Fraction of the published sample sizes (e.g. 0.1 for a smoke run)."
    ),
) -> None:
    """Measure the world models' quality gates on fresh seeds; exit 0 only when all hold."""
    from finestyle.world.check import GROUPS, CheckSettings, format_table, run_check

    s = CheckSettings(sd=sd, blip=blip, judge=judge, vae=vae, only=list(only or []))
    if not 0 < scale <= 1:
        raise UserError("--scale: must be in (0, 1]")
    for name in ("n_judge", "n_sd", "n_heldout", "n_blip", "n_localise", "n_adapter", "n_vae"):
        setattr(s, name, max(4, round(getattr(s, name) * scale)))
    bad = set(s.only) - set(GROUPS)
    if bad:
        raise UserError(f"--only: unknown gate group(s) {', '.join(sorted(bad))}")
    report = run_check(s, log=typer.echo)
    typer.echo(format_table(report))
    typer.echo(f"cpu: {report['cpu']}; {report['seconds']:.0f}s")
    if json_out:
        from finestyle.core.fs import write_json

        write_json(json_out, report)
    if not report["passed"]:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001 - internal failure: traceback then exit 1
        import traceback

        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
