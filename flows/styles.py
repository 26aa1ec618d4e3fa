"""`publish_style` flow: put a newly trained style into a swappable export and into a running server.

The production path of "many styles, one server": a style trained by `train_adapter` (or any
`finestyle train`) is proven and added to the swappable export (`export --add-style`, which never
touches the UNet graph or the other styles); the first style creates the export from its base. With
`server`, the flow then asks that server to re-read its styles (`POST /v1/admin/reload`, with the
bearer token from FINESTYLE_ADMIN_TOKEN), so the new style serves without a restart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, task

from finestyle.artifacts.adapter import adapter_info
from finestyle.core.errors import UserError
from finestyle.core.fs import read_json
from finestyle.export.steps import ExportResult
from finestyle.export.swappable import add_style, run_swappable_export
from flows.common import RETRY, markdown


@task
def add_style_task(export_dir: str, adapter: str, name: str | None, base: str | None) -> ExportResult:
    """Add the style; create the swappable export from `base` (or the adapter's own base) if absent."""
    if (Path(export_dir) / "manifest.json").is_file():
        return add_style(export_dir, adapter, name)
    base = base or adapter_info(adapter).get("base_model")
    if not base:
        raise UserError(f"{export_dir} does not exist yet and no base model is known: give `base`")
    return run_swappable_export(base, [adapter], [name] if name else [], export_dir)


@task(**RETRY)
def reload_server_task(server: str) -> list[str]:
    """POST /v1/admin/reload on a running `finestyle serve`; returns the styles it now serves."""
    import httpx

    token = os.environ.get("FINESTYLE_ADMIN_TOKEN")
    if not token:
        raise UserError(
            "reloading a server needs FINESTYLE_ADMIN_TOKEN (the token the server was started with)"
        )
    r = httpx.post(
        server.rstrip("/") + "/v1/admin/reload", headers={"Authorization": f"Bearer {token}"}, timeout=120
    )
    if r.status_code == 401:
        raise UserError(f"{server} refused the admin token (401); use the token the server was started with")
    if r.status_code == 404:
        raise UserError(f"{server} has no admin endpoint: start it with FINESTYLE_ADMIN_TOKEN set")
    r.raise_for_status()
    return r.json()["styles"]


@flow(name="publish_style", log_prints=True)
def publish_style(
    export_dir: str, adapter: str, name: str | None = None, base: str | None = None, server: str | None = None
) -> dict[str, Any]:
    """Add a trained style to a swappable export (creating it if needed), then reload `server` if given."""
    add_style_task(export_dir, adapter, name, base)
    styles = sorted(read_json(Path(export_dir) / "manifest.json")["swappable"]["styles"])
    served = reload_server_task(server) if server else None
    markdown(
        "publish-style",
        f"# style published to `{export_dir}`\n\n- styles: {', '.join(styles)}\n"
        + (f"- {server} now serves: {', '.join(served)}\n" if served is not None else ""),
        "FineStyle style publication",
    )
    return {"export": export_dir, "styles": styles, "served": served}
