"""`finestyle eval --compare`: the paper's ablation on one set of references, with equal budgets.

| variant | training data | adapted layers |
|---|---|---|
| finestyle | attention concept crops (`--concepts attention`) | cross-attention K/V (`kv`) |
| plain | whole images (`--concepts none`) | q/k/v/out of every attention layer (`attn`, diffusers' LoRA script) |
| attention_attn | attention concept crops | `attn` |
| none_kv | whole images | `kv` |

Every variant trains with the same steps, rank, learning rate and seed, and is evaluated on the same
prompts and seeds against the same base-model images; leakage counts the concepts of the attention
dataset (the references' concepts, or their truth from `labels.jsonl`) for all four.

`run_sets` (`--compare --sets N`) repeats FineStyle against plain tuning over N independent world
reference sets plus calibration sets drawn from seeds of their own, and decides with the rule of
`finestyle.eval.verdict`, fixed before any run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from finestyle.config import EvalConfig, PrepareConfig, TrainConfig
from finestyle.core.fs import read_json, write_json
from finestyle.prepare.stage import run_prepare
from finestyle.train.loop import run_train
from finestyle.world.data import render_reference_set

from .run import log_line, report_markdown, run_eval, save_grid
from .verdict import decide, verdict_markdown

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
    recipe: dict[str, Any] = field(default_factory=dict)
    """The concept-crop variants' data recipe, over the defaults: `PrepareConfig` fields
    (`concept_share`, `max_upscale`, `name_covered`) and `TrainConfig.whole_image_weight`. Leakage is
    always counted against the references' concepts under the default recipe (or their world truth)."""


PREPARE_RECIPE = ("concept_share", "max_upscale", "name_covered")
TRAIN_RECIPE = ("whole_image_weight",)


SET_SEEDS = {"calibration": 40_000_000, "test": 50_000_000}
"""First seed of each kind of reference set: calibration and test sets never share a seed."""
SETS_VARIANTS = ("finestyle", "plain")
SET_FIGURES = ("prompt_fidelity", "style_fidelity", "leakage", "background_leakage")


def set_figures(ev: dict[str, Any]) -> dict[str, float]:
    """One variant's figures on one set; with a λ1 sweep, each λ1's too (`leakage@λ1=1`)."""
    out = {k: float(ev[k]) for k in SET_FIGURES if isinstance(ev.get(k), int | float)}
    for point in ev.get("sweep") or []:
        for k in SET_FIGURES:
            if isinstance(point.get(k), int | float):
                out[f"{k}@λ1={point['style_guidance']:g}"] = float(point[k])
    return out


def run_sets(
    s: CompareSettings,
    ecfg: EvalConfig,
    n_test: int,
    n_calibration: int,
    reference_size: int = 256,
    log: Callable[[str], None] = log_line,
) -> dict[str, Any]:
    """FineStyle against plain tuning over `n_calibration` + `n_test` world reference sets, each drawn
    from a seed of its own (`render_reference_set`), every variant with the same settings; the verdict
    from the paired per-set differences (`finestyle.eval.verdict.decide`)."""
    out = Path(ecfg.out)
    figures: dict[str, list[dict[str, Any]]] = {"calibration": [], "test": []}
    for role, n in (("calibration", n_calibration), ("test", n_test)):
        for k in range(n):
            name = f"{role}-{k:02d}"
            folder = out / "sets" / name
            refs = render_reference_set(folder / "references", SET_SEEDS[role] + k, reference_size)
            log(f"sets: {name} ({role} set {k + 1}/{n})")
            rep = run_compare(
                replace(s, images=str(refs), variants=SETS_VARIANTS), replace(ecfg, out=str(folder)), log
            )
            figures[role].append({"set": name, **{v: set_figures(rep["variants"][v]) for v in SETS_VARIANTS}})
    verdict = decide(figures["calibration"], figures["test"])
    report = {
        "verdict": verdict,
        "sets": figures,
        "settings": {k: getattr(s, k) for k in s.__dataclass_fields__ if k != "images"},
        "set_seeds": SET_SEEDS,
        "reference_size": reference_size,
        "eval": {"judge": ecfg.judge, "seeds": ecfg.seeds, "steps": ecfg.steps, "n_prompts": ecfg.n_prompts},
    }
    write_json(out / "report.json", report)
    (out / "report.md").write_text(verdict_markdown(verdict) + "\n" + sets_table(figures))
    log(f"sets: {verdict['outcome']}: {verdict['why']}")
    return report


def sets_table(figures: dict[str, list[dict[str, Any]]]) -> str:
    """Per set: each variant's style fidelity and leakage."""
    lines = [
        "| set | FineStyle style | plain style | FineStyle leakage | plain leakage | difference |",
        "|---|---|---|---|---|---|",
    ]
    for role in ("calibration", "test"):
        for f in figures[role]:
            a, b = f["finestyle"], f["plain"]
            lines.append(
                f"| {f['set']} | {a['style_fidelity']:.3f} | {b['style_fidelity']:.3f} | "
                f"{a['leakage']:+.3f} | {b['leakage']:+.3f} | {a['leakage'] - b['leakage']:+.3f} |"
            )
    return "\n".join(lines) + "\n"


def compare_datasets(
    s: CompareSettings, out: Path, device: str, log: Callable[[str], None]
) -> dict[str, Path]:
    """The prepared datasets `s.variants` train on, by key: "attention" (the default recipe: leakage is
    counted against it), "none", and "attention-recipe" (the concept-crop variants' recipe, if any)."""
    bad = [v for v in s.variants if v not in VARIANTS]
    if bad:
        from finestyle.core.errors import UserError

        raise UserError(f"--variants: unknown {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    bad_keys = sorted(set(s.recipe) - set(PREPARE_RECIPE) - set(TRAIN_RECIPE))
    if bad_keys:
        from finestyle.core.errors import UserError

        raise UserError(
            f"compare recipe: unknown field {bad_keys[0]!r}; choose from {PREPARE_RECIPE + TRAIN_RECIPE}"
        )
    prep_recipe = {k: v for k, v in s.recipe.items() if k in PREPARE_RECIPE}
    # "attention" (default recipe) is what leakage is counted against; "attention-recipe" trains
    needed = {VARIANTS[v][0] for v in s.variants} | {"attention"}
    if prep_recipe and "attention" in {VARIANTS[v][0] for v in s.variants}:
        needed.add("attention-recipe")
    datasets = {}
    for key in sorted(needed):
        method = key.split("-")[0]
        ds = out / "datasets" / key
        run_prepare(
            PrepareConfig(
                images=[s.images],
                style=s.style,
                out=str(ds),
                captioner=s.captioner,
                base=s.base,
                concepts=method,
                resolution=s.resolution,
                device=device,
                **(prep_recipe if key == "attention-recipe" else {}),
            ),
            log=log,
        )
        datasets[key] = ds
    return datasets


def run_compare(
    s: CompareSettings,
    ecfg: EvalConfig,
    log: Callable[[str], None] = log_line,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train and evaluate `s.variants` on one set of references; `cache_dir` holds the base model's images
    (default `OUT/images`), so several comparisons on one set generate them once."""
    out = Path(ecfg.out)
    datasets = compare_datasets(s, out, ecfg.device, log)
    train_recipe = {k: v for k, v in s.recipe.items() if k in TRAIN_RECIPE}
    results: dict[str, Any] = {}
    grid: list[tuple[str, Any]] = []
    base: list[tuple[str, Any]] = []  # the base model's images, the grid's first row
    for name in s.variants:
        method, targets = VARIANTS[name]
        log(f"compare: {name}: {method} data, {targets} layers")
        recipe_data = method == "attention" and "attention-recipe" in datasets
        tr = run_train(
            TrainConfig(
                dataset=str(datasets["attention-recipe" if recipe_data else method]),
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
                **(train_recipe if method == "attention" else {}),
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
            cache_dir=cache_dir or out / "images",  # shared: the base model's images are generated once
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
