"""`finestyle models`: list the builtin models, or write one as a local folder."""

from __future__ import annotations

from pathlib import Path

import typer

from finestyle.cli.base import command, models_app


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
