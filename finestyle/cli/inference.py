"""`finestyle generate`, `concepts` and `serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from finestyle.cli.base import app, command, print_summary
from finestyle.cli.options import OptionSpec, config_options
from finestyle.config import (
    GenerateConfig,
    ServeConfig,
)

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
