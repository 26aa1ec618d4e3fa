"""`finestyle eval --compare`: the paper's ablation on one set of references, with equal budgets.

| variant | training data | adapted layers |
|---|---|---|
| finestyle | attention concept crops (`--concepts attention`) | cross-attention K/V (`kv`) |
| plain | whole images (`--concepts none`) | q/k/v/out of every attention layer (`attn`, diffusers' LoRA script) |
| attention_attn | attention concept crops | `attn` |
| none_kv | whole images | `kv` |

Every variant trains with the same steps, rank, learning rate and seed, and is evaluated on the same
prompts and seeds against the same base-model images; leakage counts the concepts of the attention
dataset (the references' concepts) for all four.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from finestyle.config import EvalConfig, PrepareConfig, TrainConfig
from finestyle.core.fs import read_json, write_json
from finestyle.prepare.stage import run_prepare
from finestyle.train.loop import run_train

from .run import _log, report_markdown, run_eval, save_grid

GRID_COLS = 8
VARIANTS: dict[str, tuple[str, str]] = {
    "finestyle": ("attention", "kv"),
    "plain": ("none", "attn"),
    "attention_attn": ("attention", "attn"),
    "none_kv": ("none", "kv"),
}


@dataclass
class CompareSettings:
    """What the four variants share."""

    images: str
    """Folder of reference images."""
    style: str
    """Style text, e.g. "halftone" or "watercolor painting"."""
    base: str
    """Base model (hub id, folder or builtin)."""
    captioner: str = "builtin:tiny-blip"
    """Captioner for the concept crops."""
    steps: int = 300
    """Training steps per variant."""
    rank: int = 8
    """LoRA rank."""
    lr: float = 1e-3
    """Learning rate."""
    resolution: int = 64
    """Training (and concept crop) resolution."""
    seed: int = 0
    """Training seed."""
    variants: tuple[str, ...] = tuple(VARIANTS)
    """Which variants to run."""


def run_compare(s: CompareSettings, ecfg: EvalConfig, log: Callable[[str], None] = _log) -> dict[str, Any]:
    out = Path(ecfg.out)
    bad = [v for v in s.variants if v not in VARIANTS]
    if bad:
        from finestyle.core.errors import UserError

        raise UserError(f"--variants: unknown {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    datasets = {}
    for method in sorted({VARIANTS[v][0] for v in s.variants} | {"attention"}):
        ds = out / "datasets" / method
        run_prepare(
            PrepareConfig(
                images=[s.images],
                style=s.style,
                out=str(ds),
                captioner=s.captioner,
                base=s.base,
                concepts=method,
                resolution=s.resolution,
                device=ecfg.device,
            ),
            log=log,
        )
        datasets[method] = ds
    results: dict[str, Any] = {}
    grid: list[tuple[str, Any]] = []
    base: list[tuple[str, Any]] = []  # the base model's images, the grid's first row
    for name in s.variants:
        method, targets = VARIANTS[name]
        log(f"compare: {name}: {method} data, {targets} layers")
        tr = run_train(
            TrainConfig(
                dataset=str(datasets[method]),
                base=s.base,
                out=str(out / "runs" / name),
                targets=targets,
                rank=s.rank,
                lr=s.lr,
                steps=s.steps,
                resolution=s.resolution,
                seed=s.seed,
                samples=False,
                device=ecfg.device,
            ),
            log=log,
        )
        treport = read_json(Path(tr.out) / "report.json")
        shown: list[tuple[str, Any]] = []
        ev = run_eval(
            replace(
                ecfg,
                model=s.base,
                adapter=tr.adapter,
                references=str(datasets["attention"]),
                style=s.style,
                out=str(out / "variants" / name),
            ),
            log=log,
            variant=name,
            images_out=shown,
            cache_dir=out / "images",  # shared: the base model's images are generated once
            base_images_out=None if base else base,
        )
        ev["trainable_params"] = treport["trainable_params"]
        ev["train_seconds"] = treport["total_seconds"]
        ev["train_steps"] = treport["steps"]
        ev["data"], ev["targets"] = method, targets
        results[name] = ev
        # one row per variant: the first seed of each of the first GRID_COLS prompts
        grid += [(c, im) for c, im in shown[:: ecfg.seeds][:GRID_COLS]]
    grid = [(c, im) for c, im in base[:: ecfg.seeds][:GRID_COLS]] + grid
    kind = next(iter(results.values()))["judge"]["kind"]
    report = {
        "variants": results,
        "settings": {k: getattr(s, k) for k in s.__dataclass_fields__},
        "eval": {"judge": ecfg.judge, "seeds": ecfg.seeds, "steps": ecfg.steps, "n_prompts": ecfg.n_prompts},
    }
    write_json(out / "report.json", report)
    (out / "report.md").write_text(report_markdown(results, kind))
    save_grid(
        out / "grid.png",
        grid,
        cols=min(GRID_COLS, len(grid) // (len(s.variants) + 1)),
        row_labels=["base model", *results],
    )
    log(f"compare: wrote {out / 'report.json'}")
    return report
