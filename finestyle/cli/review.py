"""`finestyle review`: look at, fix and approve a prepared dataset's rows before training on them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from finestyle.cli.base import app, command, print_summary
from finestyle.core.errors import UserError


@app.command()
@command
def review(
    dataset: Path = typer.Argument(..., help="A `finestyle prepare` output folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (a reachable one lets others edit it)."),
    port: int = typer.Option(8765, help="Port of the review page."),
    out: Optional[Path] = typer.Option(
        None, help="Folder for the new version [beside DATASET: NAME.r-KEY]; never DATASET itself."
    ),
    export: Optional[str] = typer.Option(
        None,
        "--export",
        help="label-studio: write Label Studio tasks (see --to) instead of serving the page.",
    ),
    to: Optional[Path] = typer.Option(None, help="--export: the folder to write [DATASET.label-studio]."),
    import_file: Optional[Path] = typer.Option(
        None, "--import", help="A Label Studio JSON export of those tasks: publish it as a new version."
    ),
    flow_run: Optional[str] = typer.Option(
        None, help="A flow run paused by `pipeline --review`: Approve / Reject resume it."
    ),
) -> None:
    """Review a dataset's rows in a local page (or round-trip them through Label Studio): edit texts,
    drop rows, redraw boxes, approve. Saving writes a new dataset version; DATASET never changes."""
    if export is not None:
        if export != "label-studio":
            raise UserError(f"--export: {export!r} is not a format; the one format is label-studio")
        from finestyle.review.labelstudio import export_tasks

        dest = export_tasks(dataset, to or Path(f"{dataset}.label-studio"))
        print_summary(
            "review: Label Studio tasks written",
            {
                "tasks": dest / "tasks.json",
                "labelling config": dest / "label_config.xml",
                "images": dest / "images",
            },
        )
        return
    if import_file is not None:
        from finestyle.review.labelstudio import import_tasks

        rec = import_tasks(dataset, import_file, out)
        print_summary(
            "review: imported a new version",
            {
                "dataset": rec["out"],
                "key": rec["key"],
                "changes": len(rec["changes"]),
                "previous": rec["previous_key"],
            },
        )
        return
    from finestyle.review import FLOW_RUN_DECIDERS
    from finestyle.review.app import serve_review

    decide = None
    if flow_run:
        if "prefect" not in FLOW_RUN_DECIDERS:
            raise UserError("--flow-run needs the `finestyle` command (its Prefect flows are not loaded)")
        decide = FLOW_RUN_DECIDERS["prefect"](flow_run)
    serve_review(dataset, host, port, out, decide, log=typer.echo)
