"""mkdocs hooks: the reference pages generated from the code, so they cannot drift from it.

A page holds a marker line and the build replaces it:
- `<!-- finestyle:cli -->`: every command's `--help`, as the CLI prints it at 100 columns;
- `<!-- finestyle:config -->`: every config dataclass's fields (type, default, doc);
- `<!-- finestyle:openapi -->`: the server's routes from FastAPI's OpenAPI schema;
- `<!-- finestyle:readme -->`: the README (the site's home page), its links made relative to docs/.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MARKERS = (
    "<!-- finestyle:cli -->",
    "<!-- finestyle:config -->",
    "<!-- finestyle:openapi -->",
    "<!-- finestyle:readme -->",
)


def readme() -> str:
    return (REPO / "README.md").read_text().replace("](docs/", "](")


def cli_reference() -> str:
    import click
    from typer.main import get_command

    from flows.cli import app

    root = get_command(app)
    out: list[str] = []

    def walk(cmd: Any, path: tuple[str, ...], parent: Any) -> None:
        ctx = click.Context(cmd, info_name=path[-1], parent=parent, terminal_width=100, max_content_width=100)
        if path != ("finestyle",):
            out.append(f"## {' '.join(path)}\n\n```text\n{cmd.get_help(ctx)}\n```\n")
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), (*path, name), ctx)

    top = click.Context(root, info_name="finestyle", terminal_width=100, max_content_width=100)
    out.append(f"```text\n{root.get_help(top)}\n```\n")
    for name in root.list_commands(top):
        walk(root.get_command(top, name), ("finestyle", name), top)
    return "\n".join(out)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _num(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**63 else v


def config_reference() -> str:
    from finestyle import config
    from finestyle.config import field_docs

    classes = [
        config.PrepareConfig,
        config.TrainConfig,
        config.ExportConfig,
        config.EvalConfig,
        config.GenerateConfig,
        config.ServeConfig,
        config.PipelineConfig,
    ]
    out = []
    for cls in classes:
        docs = field_docs(cls)
        head = (cls.__doc__ or "").strip().split("\n\n")[0]
        rows = [
            f"| `{f.name}` | `{_cell(f.type)}` | `{_cell(_default(f))}` | {_cell(docs.get(f.name, ''))} |"
            for f in dataclasses.fields(cls)
        ]
        out.append(
            f"## {cls.__name__}\n\n{_cell(head)}\n\n| field | type | default | meaning |\n|---|---|---|---|\n"
            + "\n".join(rows)
            + "\n"
        )
    return "\n".join(out)


def openapi_reference() -> str:
    from finestyle.config import ServeConfig
    from finestyle.serve.app import create_app

    schema = create_app(ServeConfig(export="unused", max_size=1024)).openapi()
    comps = schema.get("components", {}).get("schemas", {})
    out = []
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            out.append(f"## `{method.upper()} {path}`\n")
            if op.get("description"):
                out.append(_cell(op["description"]) + "\n")
            ref = (
                op.get("requestBody", {})
                .get("content", {})
                .get("application/json", {})
                .get("schema", {})
                .get("$ref")
            )
            if ref:
                body = comps[ref.rsplit("/", 1)[1]]
                req = set(body.get("required", []))
                out.append("| field | type | default | limits |\n|---|---|---|---|")
                for name, p in body.get("properties", {}).items():
                    kinds = [x.get("type", "") for x in p.get("anyOf", [p])]
                    limits = {}
                    for x in [p, *p.get("anyOf", [])]:
                        limits.update(
                            {k: _num(x[k]) for k in ("minimum", "maximum", "maxLength", "enum") if k in x}
                        )
                    default = "required" if name in req else json.dumps(p.get("default"))
                    out.append(
                        f"| `{name}` | {_cell(' or '.join(k for k in kinds if k))} | `{_cell(default)}` | "
                        f"{_cell(json.dumps(limits) if limits else '')} |"
                    )
                out.append("")
            codes = ", ".join(sorted(op.get("responses", {})))
            out.append(f"Responses: {codes}.\n")
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    builders = dict(zip(MARKERS, (cli_reference, config_reference, openapi_reference, readme), strict=True))
    for marker, build in builders.items():
        if marker in markdown:
            markdown = markdown.replace(marker, build())
    return markdown
