"""`eval --report-to`: an evaluation's figures in the tracked run that trained the adapter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from finestyle.config import EvalConfig, to_dict
from finestyle.core.fs import read_json
from finestyle.core.tracking import RunTracker, log_to_run, parse_trackers, read_identity
from finestyle.runtime.backend import log_line


def _training_run_dir(cfg: EvalConfig) -> Path | None:
    """The training run folder of the evaluated adapter (directly, or through an export's manifest)."""
    adapter = cfg.adapter
    if not adapter and (Path(cfg.model) / "manifest.json").is_file():
        adapter = read_json(Path(cfg.model) / "manifest.json").get("adapter")
    return Path(adapter).parent if adapter else None


def report_eval(cfg: EvalConfig, report: dict[str, Any], log: Callable[[str], None] = log_line) -> None:
    """The eval's figures and intervals into the adapter's tracked run (at the adapter's step), or a new
    run in `cfg.out` when the adapter's training was not tracked with these trackers."""
    values = {
        f"eval/{k}": float(report[k]) for k in ("prompt_fidelity", "style_fidelity", "leakage") if k in report
    }
    for k, (lo, hi) in (report.get("ci95") or {}).items():
        if lo is not None and hi is not None:
            values[f"eval/{k}_ci95_low"], values[f"eval/{k}_ci95_high"] = float(lo), float(hi)
    run = _training_run_dir(cfg)
    wanted = parse_trackers(cfg.report_to)
    if run is not None and set(wanted) <= set(read_identity(run).get("trackers", [])):
        info = run / "adapter" / "finestyle_adapter.json"
        step = int(read_json(info).get("step", 0)) if info.is_file() else 0
        log_to_run(run, values, step)
        log(f"eval: figures logged to the training run's {', '.join(wanted)} ({run / 'tracking.json'})")
        return
    tracker = RunTracker(wanted, Path(cfg.out), name="finestyle-eval")
    tracker.hyperparameters({k: v for k, v in to_dict(cfg).items() if k != "report_to"})
    tracker.log(values, 0)
    tracker.finish()
    log(f"eval: figures logged to a new {', '.join(wanted)} run ({Path(cfg.out) / 'tracking.json'})")
