"""A review's decision, sent to a flow run that `pipeline --review` paused (Prefect's run input)."""

from __future__ import annotations

from typing import Any

from prefect.input import RunInput

from .app import Decide


class ReviewDecision(RunInput):
    """What a paused `finestyle-pipeline` run waits for: Prefect's UI shows these fields as a form."""

    approved: bool = False
    """Train on the dataset (true), or fail the run and train nothing (false)."""
    note: str = ""
    """Why: kept in the run's logs and the review record."""
    dataset: str = ""
    """The reviewed version to train on (the review page fills it in); empty: the prepared dataset."""
    key: str = ""
    """That version's content key, as the review page saw it."""


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
