"""`finestyle world train --all`: the whole world, VAE → sd → blip → judge, resumable, each model
checked (`world check`, its own gates) before the next one starts.

Layout under OUT: one run folder per model (`vae/`, `sd/`, `blip/`, `judge/`, each `world train`'s
own: checkpoints, `model/`, `report.json`), its gates in `MODEL/check.json`, the shared render cache,
and `world.json`, the summary. A killed run started again with the same OUT resumes inside the model it
stopped in (from its last checkpoint: the steps draw per-step seeds, so the weights equal an
uninterrupted run's) and skips the models and checks already done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from finestyle.core.fs import write_json

from .check import CheckSettings, format_table, run_check
from .train import DEFAULTS, WorldTrainConfig, duration, train_world_model

ORDER = ("vae", "sd", "blip", "judge")
"""Training order: sd trains on the VAE's latents, the judge on its round trips."""
SIZES = ("n_judge", "n_sd", "n_heldout", "n_blip", "n_localise", "n_adapter", "n_vae")


@dataclass
class WorldAllConfig:
    """The whole world's run: per-model defaults (`DEFAULTS`) with these overrides."""

    out: str = "world-runs"
    """Folder holding one run folder per model, their gates and `world.json`."""
    steps: int | None = None
    """Every model's steps (default: each model's own)."""
    batch_size: int | None = None
    """Every model's batch (default: each model's own)."""
    n_train: int | None = None
    """Every model's distinct renders (default: each model's own)."""
    checkpoint_every: int = 250
    """Steps between checkpoints."""
    threads: int = 2
    """torch threads."""
    device: str = "auto"
    """cuda | cpu | auto."""
    check_scale: float = 1.0
    """Fraction of `world check`'s published sample sizes measured after each model (0: no checks)."""
    judge: str = "builtin:world-judge"
    """The judge that reads world-sd's images before this run's own judge exists."""


def model_config(cfg: WorldAllConfig, model: str) -> WorldTrainConfig:
    """One model's `world train` config inside the whole run."""
    c = WorldTrainConfig(model=model, out=str(Path(cfg.out) / model), **DEFAULTS[model])
    c = replace(c, checkpoint_every=cfg.checkpoint_every, threads=cfg.threads, device=cfg.device)
    for name in ("steps", "batch_size", "n_train"):
        if getattr(cfg, name) is not None:
            setattr(c, name, getattr(cfg, name))
    return c


def check_settings(cfg: WorldAllConfig, model: str) -> CheckSettings:
    """The gates of `model`, measured on this run's models (the shipped judge until the run has one)."""
    out = Path(cfg.out)
    own_judge = out / "judge" / "model"
    s = CheckSettings(
        sd=str(out / "sd" / "model"),
        blip=str(out / "blip" / "model"),
        judge=str(own_judge) if (own_judge / "config.json").is_file() else cfg.judge,
        vae=str(out / "vae" / "model"),
        only=[model],
    )
    for name in SIZES:
        setattr(s, name, max(4, round(getattr(s, name) * cfg.check_scale)))
    return s


def _done(run: Path, steps: int) -> bool:
    try:
        rep = json.loads((run / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return rep.get("config", {}).get("steps") == steps and (run / "model").is_dir()


def train_all(cfg: WorldAllConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume) every world model in order, checking each; the summary written to world.json."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary: dict[str, Any] = {"config": asdict(cfg), "models": {}}
    for i, model in enumerate(ORDER, 1):
        mc = model_config(cfg, model)
        run = Path(mc.out)
        if _done(run, mc.steps):
            log(f"world {i}/{len(ORDER)}: {model} already trained ({mc.steps} steps); skipped")
        else:
            log(
                f"world {i}/{len(ORDER)}: {model}, {mc.steps} steps × batch {mc.batch_size} (ETA every 50 steps)"
            )
            train_world_model(mc, log=log)
        report = json.loads((run / "report.json").read_text())
        entry: dict[str, Any] = {
            "minutes": round(report.get("seconds_total", 0) / 60, 1),
            "cpu": report.get("cpu"),
        }
        if cfg.check_scale > 0:
            entry["check"] = _check(cfg, model, run, log)
        summary["models"][model] = entry
        log(f"world: {model} done; {duration(time.time() - t0)} in this run so far")
    summary["passed"] = all(m.get("check", {}).get("passed", True) for m in summary["models"].values())
    write_json(out / "world.json", summary)
    return summary


def _check(cfg: WorldAllConfig, model: str, run: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """`world check` of one model's gates, kept in RUN/check.json (measured once per trained model)."""
    path = run / "check.json"
    model_time = (run / "model").stat().st_mtime
    if path.is_file() and path.stat().st_mtime >= model_time:
        return json.loads(path.read_text())
    log(f"world: checking {model} (scale {cfg.check_scale:g} of the published sample sizes)")
    rep = run_check(check_settings(cfg, model), log=log)
    log(format_table(rep))
    write_json(path, rep)
    return rep
