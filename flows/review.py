"""A person's review between prepare and train: the pipeline pauses, waiting for a `ReviewDecision`.

`pipeline --review` (a deployment's `review` parameter) pauses its flow run after prepare with
`pause_flow_run(wait_for_input=ReviewDecision)` and serves the review page from the run's process. Its
Approve publishes the reviewed version and resumes the run with that version's path and key; Reject
resumes it with `approved: false`. Prefect's UI shows the same fields as the paused run's Resume form,
so a person can approve or reject there too (the prepared dataset, unchanged, is then what trains).
A rejected review, or one with no decision before `review_timeout`, fails the run with one line and
trains nothing.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from prefect.input import RunInput
from pydantic import Field

from finestyle.core.errors import UserError
from finestyle.review.app import Decide
from flows.common import inline_image, markdown


class ReviewDecision(RunInput):
    """What a paused `finestyle-pipeline` run waits for: Prefect's UI shows these fields as a form."""

    # descriptions as Field(...): Prefect's Resume form shows them under each field
    approved: bool = Field(
        False, description="Train on the dataset (on), or fail the run and train nothing (off)."
    )
    note: str = Field("", description="Why: kept in the run's log.")
    dataset: str = Field(
        "",
        description="The reviewed version to train on (the review page fills it in); empty: the prepared dataset.",
    )
    key: str = Field("", description="That version's content key, as the review page saw it.")


def resume_decider(flow_run_id: str) -> Decide:
    """A `Decide` that resumes the paused flow run with the review's decision."""

    def decide(record: dict[str, Any]) -> str:
        from uuid import UUID

        from prefect.flow_runs import resume_flow_run

        decision = ReviewDecision(
            approved=bool(record.get("approved")),
            note=str(record.get("note") or ""),
            dataset=str(record.get("out") or ""),
            key=str(record.get("key") or ""),
        )
        resume_flow_run(UUID(str(flow_run_id)), run_input=decision.model_dump())
        return f"flow run {flow_run_id} resumed ({'approved' if decision.approved else 'rejected'})"

    return decide


def _start_page(dataset: str, host: str, port: int, decide: Decide) -> Any:
    """The review page in a thread of this process; returns its uvicorn server (set should_exit)."""
    import uvicorn

    from finestyle.core.env import check_port_free
    from finestyle.review.app import ReviewState, create_review_app

    check_port_free(host, port)
    server = uvicorn.Server(
        uvicorn.Config(
            create_review_app(ReviewState(dataset, decide=decide)), host=host, port=port, log_level="warning"
        )
    )
    threading.Thread(target=server.run, name="finestyle-review", daemon=True).start()
    return server


def await_review(dataset: str, host: str, port: int, timeout_s: int, log: Any = print) -> str:
    """Pause this flow run until a person decides; return the dataset to train on."""
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    from prefect.runtime import flow_run

    from finestyle.review.versions import dataset_key

    run_id = str(flow_run.id)
    server = _start_page(dataset, host, port, resume_decider(run_id)) if port else None
    url = f"http://{host}:{port}/" if server else None
    markdown(
        "review-waiting",
        "# Waiting for review\n\n"
        + (
            f"Open the review page: [{url}]({url}) (edit, drop, redraw, then Approve or Reject).\n\n"
            if url
            else ""
        )
        + f"Or use this run's **Resume** form: `approved` true trains `{dataset}` as prepared; false fails the "
        f"run. Run id `{run_id}`; the run waits {timeout_s} s.\n\n"
        + inline_image(Path(dataset) / "preview.png", "dataset preview"),
        "FineStyle: the dataset waits for a person's review",
    )
    log(
        f"pipeline: waiting for review of {dataset}" + (f" at {url}" if url else "") + f" (flow run {run_id})"
    )
    try:
        decision = pause_flow_run(wait_for_input=ReviewDecision, timeout=timeout_s, poll_interval=2)
    except FlowPauseTimeout:
        raise UserError(f"review: no decision within {timeout_s} s; nothing was trained") from None
    finally:
        if server:
            server.should_exit = True
    if not decision.approved:
        raise UserError(
            f"review rejected{': ' + decision.note if decision.note else ''}; nothing was trained"
        )
    chosen = decision.dataset or dataset
    if not Path(chosen).is_dir():
        raise UserError(f"review approved {chosen!r}, which is not a dataset folder; nothing was trained")
    if decision.key and dataset_key(chosen) != decision.key:
        raise UserError(
            f"review approved {chosen!r} at key {decision.key[:10]}, but it has changed since; nothing was trained"
        )
    log(f"pipeline: review approved {chosen}" + (f" ({decision.note})" if decision.note else ""))
    return chosen
