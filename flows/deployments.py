"""Deployments in Python (the same three as prefect.yaml), for `python -m flows.deployments`.

`build_deployments()` returns RunnerDeployments; `main()` serves them from this process (no work
pool needed: `prefect server start --host 127.0.0.1` in one shell, this in another).
"""

from __future__ import annotations

from typing import Any

from flows.pipeline import finestyle_pipeline
from flows.watch import prepare_watched

WATCH_CRON = "0 * * * *"


def build_deployments() -> list[Any]:
    return [
        finestyle_pipeline.to_deployment(
            name="finestyle-pipeline",
            parameters={"config": {"workdir": "runs/pipeline"}, "force": []},
            description="prepare -> train -> export",
        ),
        prepare_watched.to_deployment(
            name="prepare-watched",
            cron=WATCH_CRON,
            parameters={"watch_dir": "data/incoming", "datasets_dir": "data/prepared"},
            description="hourly: prepare new or changed reference folders",
        ),
    ]


def main() -> None:
    from prefect import serve

    serve(*build_deployments())


if __name__ == "__main__":
    main()
