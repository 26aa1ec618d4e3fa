"""`prepare_dataset` flow: reference images -> concept crop/caption dataset.

Tasks wrap the library's stage functions: plan (discover + content key), process_chunk (ingest,
extract concepts, caption; mapped over chunks of images, on threads or on a Dask cluster), publish.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped

from finestyle.config import PrepareConfig, from_dict, to_dict
from finestyle.prepare.stage import (
    PreparePlan,
    PrepareResult,
    plan_prepare,
    process_chunk,
    publish_prepared,
    scratch_dir,
    summary_table,
)
from flows.common import RETRY, inline_image, markdown, table


@task(**RETRY)
def plan_task(config: dict[str, Any]) -> PreparePlan:
    """Discover candidate images, compute the content key, check for an identical dataset."""
    return plan_prepare(from_dict(PrepareConfig, config))


@task(**RETRY)
def process_chunk_task(
    paths: list[str], config: dict[str, Any], scratch: str, chunk_id: int
) -> dict[str, Any]:
    """Ingest + concepts + captions for one chunk; returns a small manifest (crops go to `scratch`)."""
    return process_chunk(paths, from_dict(PrepareConfig, config), scratch, chunk_id)


@task(**RETRY, log_prints=False)
def publish_task(config: dict[str, Any], plan: PreparePlan, manifests: list[dict[str, Any]]) -> PrepareResult:
    """Merge the chunks and publish the dataset atomically.

    Its messages go to the run logger directly: with Prefect's print-to-log patch on, the datasets
    library's fingerprinting (dill, which captures `dis` output by swapping stdout) would flood the
    run's log with bytecode listings."""
    return publish_prepared(from_dict(PrepareConfig, config), plan, manifests, log=get_run_logger().info)


@task
def publish_prepare_artifacts(result: PrepareResult) -> None:
    rep = json.loads((Path(result.out) / "report.json").read_text())
    c = rep["counts"]
    skipped = "\n".join(f"- `{s['path']}`: {s['reason']}" for s in rep["skipped"]) or "- none"
    markdown(
        "prepare-summary",
        (
            f"# prepare: {'reused' if result.reused else 'built'} `{result.out}`\n\n"
            f"- method: **{rep['method']}**, style: *{rep['config']['style']}*\n"
            f"- rows: **{c['rows']}** from {c['images_used']} image(s) ({c['rows_per_method']})\n"
            f"- preview: `{result.out}/preview.png`, report: `{result.out}/report.json`\n\n"
            f"{inline_image(Path(result.out) / 'preview.png', 'dataset preview: every crop with its text')}\n\n"
            f"## Skipped inputs ({c['skipped']})\n{skipped}\n"
        ),
        "FineStyle prepare summary",
    )
    table("prepare-concepts", summary_table(Path(result.out) / "report.json"), "Concepts per image")


@flow(name="prepare_dataset", log_prints=True)
def prepare_dataset(config: dict[str, Any] | None = None, chunk_size: int = 8) -> PrepareResult:
    """Stage 1 as a flow. `config` is a PrepareConfig as a dict (validated here).

    The chunks run on the flow's task runner: threads by default, a Dask cluster with
    `prepare_dataset.with_options(task_runner=DaskTaskRunner(...))` (see `task_runner_for`).
    """
    cfg = from_dict(PrepareConfig, config or {})
    plan = plan_task(to_dict(cfg))
    print(f"prepare: {len(plan.candidates)} candidate image(s), {len(plan.skipped)} skipped entries")
    if plan.reuse:
        result = plan.reuse
    else:
        cands = plan.candidates
        chunks = [cands[i : i + chunk_size] for i in range(0, len(cands), chunk_size)]
        futures = process_chunk_task.map(
            chunks,
            unmapped(to_dict(cfg)),
            unmapped(str(scratch_dir(cfg, plan.cache_key))),
            list(range(len(chunks))),
        )
        result = publish_task(to_dict(cfg), plan, [f.result() for f in futures])
    publish_prepare_artifacts(result)
    return result


def task_runner_for(name: str, workers: int = 2) -> Any:
    """The task runner named in the pipeline config: `default` (threads) or `dask` (local cluster,
    or the scheduler at $FINESTYLE_DASK_ADDRESS)."""
    import os

    if name == "default":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner()
    if name == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            from finestyle.core.errors import UserError

            raise UserError("task_runner: dask needs prefect-dask: pip install 'finestyle[dask]'") from exc
        addr = os.environ.get("FINESTYLE_DASK_ADDRESS")
        if addr:
            return DaskTaskRunner(address=addr)
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True}
        )
    from finestyle.core.errors import UserError

    raise UserError(f"task_runner: unknown value {name!r}; use default or dask")
