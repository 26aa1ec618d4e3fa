"""`finestyle world`: render the procedural world, train, install and check its builtin models."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from finestyle.cli.base import command, world_app
from finestyle.core.errors import UserError


@world_app.command("render")
@command
def world_render(
    out: Path = typer.Argument(..., help="Folder for the PNGs and labels.jsonl (published atomically)."),
    n: int = typer.Option(16, "--n", help="Number of scenes."),
    size: int = typer.Option(64, "--size", help="Image side in pixels (>= 32)."),
    style: Optional[str] = typer.Option(
        None, "--style", help="A style name, or `heldout`  [default: each scene's own]"
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
    compile: bool = typer.Option(False, "--compile", help="torch.compile the trained modules (inductor)."),
    bench: int = typer.Option(
        0,
        help="N > 0: time N steps eager, then N compiled (fresh folders under a temporary one); no training.",
    ),
    all_models: bool = typer.Option(
        False,
        "--all",
        help="The whole world: vae → sd → blip → judge under OUT/MODEL, each checked before the next; resumes.",
    ),
    check_scale: float = typer.Option(
        1.0, help="--all: fraction of `world check`'s sample sizes measured after each model (0: none)."
    ),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints [250]."),
) -> None:
    """Train one of the world's models from a seed (or `--all` of them): progress, checkpoints, resume."""
    from finestyle.world.train import DEFAULTS, WorldTrainConfig, bench_world_step, train_world_model

    if all_models:
        _train_all(out, steps, batch_size, n_train, threads, device, check_scale, checkpoint_every)
        return

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
    cfg.compile = compile
    if checkpoint_every is not None:
        cfg.checkpoint_every = checkpoint_every
    if bench > 0:
        if bench < 3:
            raise UserError("--bench: give at least 3 steps (the first one is the compile)")
        r = bench_world_step(cfg, bench, log=typer.echo)
        typer.echo(
            f"{model}: compiled steady step {r['compiled_speedup']:.2f}x eager "
            f"(batch {r['batch_size']}, {r['threads']} thread(s), {r['cpu']})"
        )
        return
    path = train_world_model(cfg, log=typer.echo)
    typer.echo(f"trained {model}: {path}")


def _train_all(
    out: Path,
    steps: Optional[int],
    batch_size: Optional[int],
    n_train: Optional[int],
    threads: Optional[int],
    device: Optional[str],
    check_scale: float,
    checkpoint_every: Optional[int],
) -> None:
    from finestyle.world.all import WorldAllConfig, train_all

    if not 0 <= check_scale <= 1:
        raise UserError("--check-scale: must be in [0, 1]")
    cfg = WorldAllConfig(
        out=str(out), steps=steps, batch_size=batch_size, n_train=n_train, check_scale=check_scale
    )
    cfg.threads = threads or cfg.threads
    cfg.device = device or cfg.device
    cfg.checkpoint_every = checkpoint_every or cfg.checkpoint_every
    summary = train_all(cfg, log=typer.echo)
    for model, m in summary["models"].items():
        gates = m.get("check", {}).get("gates", {})
        failed = [g for g, v in gates.items() if not v["pass"]]
        verdict = (
            "not checked"
            if "check" not in m
            else ("gates hold" if not failed else "fails " + ", ".join(failed))
        )
        typer.echo(f"{model}: {m['minutes']} min on {m['cpu']}; {verdict}")
    typer.echo(f"summary: {out / 'world.json'}")
    if not summary["passed"]:
        raise typer.Exit(1)


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


@world_app.command("bench-unet")
@command
def world_bench_unet(
    model: Optional[str] = typer.Option(
        None, help="A world-sd pipeline folder whose UNet config to time [this version's design]."
    ),
    batch: int = typer.Option(32, help="Latents per step (world-sd trains at 32)."),
    repeats: int = typer.Option(5, help="Timed steps per UNet and precision (the median counts)."),
    threads: int = typer.Option(0, help="torch threads [all cores]."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """world-sd's training step (forward + backward) against the UNet shipped on 2026-12-05, side by side."""
    from finestyle.world.bench import bench_unet_step

    if batch < 1 or repeats < 1:
        raise UserError("--batch and --repeats: at least 1")
    r = bench_unet_step(model, batch, repeats, threads, log=typer.echo)
    note = "" if r["bf16_units"] else " (no bf16 units: bf16 is emulated here, fp32 is the figure)"
    typer.echo(
        f"world-sd step: {r['speedup']:.2f}x the 2026-12-05 UNet (goal >= {r['goal']:g}x), best precision "
        f"each, batch {r['batch']}, {r['threads']} thread(s), {r['cpu']}{note}"
    )
    if json_out:
        from finestyle.core.fs import write_json

        write_json(json_out, r)
