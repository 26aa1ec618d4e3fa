"""The CPU deployments of prefect.yaml, served from one process: `python -m flows.deployments`.

`build_deployments()` returns RunnerDeployments with the same names, parameters, descriptions and
schedules as prefect.yaml's `finestyle-pipeline` and `prepare-watched` (read from it, so the two
cannot drift); `main()` serves them from this process, with no work pool or worker. Run it from the
checkout (relative paths in the parameters are relative to the working directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from flows.pipeline import finestyle_pipeline
from flows.watch import prepare_watched

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"
WATCH_CRON = "0 * * * *"


def _spec(name: str) -> dict[str, Any]:
    path = PREFECT_YAML if PREFECT_YAML.is_file() else Path.cwd() / "prefect.yaml"
    spec = yaml.safe_load(path.read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)


def build_deployments() -> list[Any]:
    pipe, watch = _spec("finestyle-pipeline"), _spec("prepare-watched")
    (sched,) = watch["schedules"]
    return [
        finestyle_pipeline.to_deployment(
            name=pipe["name"], parameters=pipe["parameters"], description=pipe["description"]
        ),
        prepare_watched.to_deployment(
            name=watch["name"],
            cron=sched["cron"],
            parameters=watch["parameters"],
            description=watch["description"],
        ),
    ]


def main() -> None:
    from prefect import serve

    serve(*build_deployments())


if __name__ == "__main__":
    main()
