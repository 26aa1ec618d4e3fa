"""Experiment trackers through accelerate's (TensorBoard, MLflow): one tracked run per training run.

A run's identity is kept in `OUT/tracking.json` (the trackers, the MLflow run id and tracking URI,
the TensorBoard folder), so a resumed training, and `finestyle eval` or `export --register` of what it
trained, write to the same run rather than starting new ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from finestyle.core.errors import UserError

TRACKING_FILE = "tracking.json"
EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
"""tracker -> (module it needs, the finestyle extra that installs it)."""


def parse_trackers(report_to: str) -> list[str]:
    """`tensorboard,mlflow` -> ["tensorboard", "mlflow"]; none or empty -> []."""
    return [t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"]


def require(tracker: str, flag: str = "--report-to") -> None:
    """A one-line UserError naming the extra when the tracker's package is missing."""
    module, extra = EXTRAS[tracker]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{flag} {tracker}: {module} is not installed; pip install 'finestyle[{extra}]'")


def mlflow_uri(uri: str, out: Path) -> str:
    """The MLflow tracking URI: the given one, else $MLFLOW_TRACKING_URI, else a SQLite store in OUT."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"


def artifact_root(tracking_uri: str, out: Path) -> str | None:
    """Where a new experiment keeps its artifacts: beside the run (OUT/mlartifacts) for a local SQLite or
    file store, else the tracking server's own default (None). MLflow's fallback, ./mlruns in
    the working directory, would scatter artifacts wherever the command ran."""
    if tracking_uri.startswith(("sqlite:", "file:")):  # local stores; a server keeps its own
        return (out.absolute() / "mlartifacts").as_uri()
    return None


def read_identity(out: Path) -> dict[str, Any]:
    """The tracked run's identity saved in OUT/tracking.json ({} when the run was not tracked)."""
    try:
        return json.loads((out / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return {}


class RunTracker:
    """The trackers of one run: scalars per step, images, hyperparameters, tags; resumable."""

    def __init__(self, trackers: list[str], out: Path, uri: str = "", name: str = "finestyle") -> None:
        for t in trackers:
            require(t)
        self.out, self.names, self.trackers = out, trackers, []
        saved = read_identity(out)
        self.identity: dict[str, Any] = {"trackers": trackers}
        if "tensorboard" in trackers:
            from accelerate.tracking import TensorBoardTracker

            logdir = Path(uri or saved.get("tensorboard_root") or out / "tracking").absolute()
            tb = TensorBoardTracker(name, str(logdir))
            tb.start()
            self.trackers.append(tb)
            self.identity["tensorboard_dir"] = str(Path(logdir) / name)
            self.identity["tensorboard_root"] = str(logdir)
        if "mlflow" in trackers:
            import mlflow
            from accelerate.tracking import MLflowTracker

            tracking_uri = saved.get("mlflow_uri") or mlflow_uri(uri, out)
            mlflow.set_tracking_uri(tracking_uri)
            if mlflow.active_run() is not None:  # left open by a failed attempt in this process (a retry)
                mlflow.end_run(status="FAILED")
            ml = MLflowTracker(
                experiment_name=name,
                logging_dir=artifact_root(tracking_uri, out),
                run_id=saved.get("mlflow_run_id"),
                run_name=out.name,
            )
            ml.start()
            self.trackers.append(ml)
            self.identity.update(mlflow_uri=tracking_uri, mlflow_run_id=ml.active_run.info.run_id)
        from finestyle.core.fs import write_json

        write_json(out / TRACKING_FILE, self.identity)

    def hyperparameters(self, values: dict[str, Any]) -> None:
        """The config as hyperparameters (lists and None as text)."""
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in values.items()
        }
        for t in self.trackers:
            t.store_init_configuration(flat)

    def tags(self, tags: dict[str, str]) -> None:
        """Content keys and the like: MLflow tags; TensorBoard text entries."""
        for t in self.trackers:
            if t.name == "mlflow":
                import mlflow

                mlflow.set_tags(tags)
            else:
                t.log({f"tags/{k}": str(v) for k, v in tags.items()}, step=0)

    def log(self, values: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log(values, step=step)

    def image(self, key: str, path: Path, step: int) -> None:
        """An image file (a sample grid) at `step`: TensorBoard's image panel, MLflow's image log."""
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        for t in self.trackers:
            if t.name == "tensorboard":
                t.log_images({key: arr[None]}, step=step, dataformats="NHWC")
            else:
                import mlflow

                mlflow.log_image(arr, key=key, step=step)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()


def log_to_run(
    out: Path, values: dict[str, float], step: int = 0, tags: dict[str, str] | None = None
) -> list[str]:
    """Log `values` (and tags) into the tracked run recorded in OUT/tracking.json; the trackers written."""
    ident = read_identity(out)
    if not ident.get("trackers"):
        return []
    tracker = RunTracker(ident["trackers"], out, uri=ident.get("tensorboard_root", ""))
    try:
        if tags:
            tracker.tags(tags)
        tracker.log(values, step)
    finally:
        tracker.finish()
    return tracker.names
