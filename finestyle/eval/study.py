"""`finestyle eval --compare --study`: FineStyle's data recipe, one knob at a time, on the calibration sets.

The paper gives the idea (one reference becomes many concept-focused pairs), not the recipe. Each knob
below changes one choice against today's recipe; every knob trains FineStyle on the same calibration
sets, seeds and budget, and its leakage difference is paired per set with plain tuning on the same set.
The study runs on the calibration sets only (the verdict's `SET_SEEDS["calibration"]`), so the test sets
stay unseen until the verdict runs with the chosen recipe. `CHOICE_RULE` was written before any run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from finestyle.config import EvalConfig
from finestyle.core.fs import write_json
from finestyle.world.data import render_reference_set

from .compare import SET_SEEDS, CompareSettings, run_compare, set_figures
from .run import log_line
from .verdict import CONTROL_LEAKAGE, CONTROL_STYLE, STYLE_MARGIN, t_interval


@dataclass(frozen=True)
class Knob:
    name: str
    what: str
    recipe: dict[str, Any] = field(default_factory=dict)
    """`CompareSettings.recipe` for FineStyle (data knobs)."""
    steps_factor: float = 0.0
    """A training budget for both variants, as a multiple of the study's steps (budget knobs); 0: the
    study's own."""


TODAY = "today"
"""The baseline's name: the recipe before the study (the defaults until 2026-12-06), set explicitly so
that the study measures the same thing whatever the defaults are now."""
BASELINE_RECIPE: dict[str, Any] = {
    "concept_share": [1.0],
    "max_upscale": 0.0,
    "name_covered": 0.0,
    "whole_image_weight": 1.0,
}
KNOBS: tuple[Knob, ...] = (
    Knob(
        TODAY,
        "the recipe before the study: the concept's box + 8% margin, own concept named, whole images 1×",
    ),
    Knob(
        "context", "context margin: a concept fills at most 60% of its crop's side", {"concept_share": [0.6]}
    ),
    Knob(
        "multi-scale",
        "two scales: a concept fills 60% and 30% of its crop's side",
        {"concept_share": [0.6, 0.3]},
    ),
    Knob("upscale", "no crop enlarged more than 2× to the training size", {"max_upscale": 2.0}),
    Knob("naming", "a crop's text names every concept with ≥ 50% of its box inside", {"name_covered": 0.5}),
    Knob("whole-image", "whole images drawn 3× per epoch", {"whole_image_weight": 3.0}),
    Knob("budget", "3× the training steps for both variants, same learning rate", steps_factor=3.0),
)
"""Each knob's values were fixed before any run; one knob at a time against `TODAY`."""
COMBINED = "combined"

CHOICE_RULE = (
    "Budget: the verdict uses the smallest training budget in the study at which the positive control "
    f"holds on the calibration sets (plain style fidelity >= {CONTROL_STYLE:.2f} and plain leakage >= "
    f"+{CONTROL_LEAKAGE:.2f}); if none holds, today's. Data knobs (at today's budget): a knob is adopted "
    "when its mean per-set change in the leakage difference (FineStyle minus plain) against today's recipe "
    f"is below 0 and FineStyle's mean style fidelity is at most {STYLE_MARGIN:.2f} below plain's; of two "
    "values of one field, the lower mean. With two or more adopted, their combination runs on the same "
    "sets and is chosen if its mean leakage difference is no higher than the best single knob's, else "
    "that knob alone. With none adopted, today's recipe stays."
)


def select_knobs(names: str | None) -> tuple[Knob, ...]:
    """`--knobs a,b`: those knobs and today's recipe, in `KNOBS` order; None: all."""
    if not names:
        return KNOBS
    wanted = {n.strip() for n in names.split(",") if n.strip()}
    unknown = sorted(wanted - {k.name for k in KNOBS})
    if unknown:
        from finestyle.core.errors import UserError

        raise UserError(f"--knobs: unknown {unknown[0]!r}; choose from {', '.join(k.name for k in KNOBS)}")
    return tuple(k for k in KNOBS if k.name in wanted | {TODAY})


def _paired(rows: list[dict[str, Any]], knob: str) -> list[float]:
    return [r[knob]["finestyle"]["leakage"] - r[knob]["plain"]["leakage"] for r in rows if knob in r]


def summarise(rows: list[dict[str, Any]], knob: str) -> dict[str, Any]:
    """One knob over the sets: the leakage difference, its change against today's, the style figures."""
    fs = [r[knob]["finestyle"] for r in rows if knob in r]
    pl = [r[knob]["plain"] for r in rows if knob in r]
    diff = _paired(rows, knob)
    change = [a - b for a, b in zip(diff, _paired(rows, TODAY), strict=True)] if knob != TODAY else []
    style_fs = float(np.mean([f["style_fidelity"] for f in fs]))
    style_pl = float(np.mean([f["style_fidelity"] for f in pl]))
    return {
        "leakage_difference": t_interval(diff),
        "change_vs_today": t_interval(change) if change else None,
        "finestyle_style": t_interval([f["style_fidelity"] for f in fs]),
        "plain_style": style_pl,
        "plain_leakage": float(np.mean([f["leakage"] for f in pl])),
        "finestyle_prompt": float(np.mean([f["prompt_fidelity"] for f in fs])),
        "style_holds": style_fs >= style_pl - STYLE_MARGIN,
        "control_holds": style_pl >= CONTROL_STYLE
        and float(np.mean([f["leakage"] for f in pl])) >= CONTROL_LEAKAGE,
    }


def adopted(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The data knobs the rule adopts (one per recipe field), best first."""
    data = [k for k in KNOBS if k.recipe and k.name in summary]
    ok = [
        k
        for k in data
        if summary[k.name]["change_vs_today"]
        and summary[k.name]["change_vs_today"]["mean"] < 0
        and summary[k.name]["style_holds"]
    ]
    best: dict[str, Knob] = {}
    for k in ok:
        (f,) = k.recipe  # one field per knob
        if (
            f not in best
            or summary[k.name]["change_vs_today"]["mean"] < summary[best[f].name]["change_vs_today"]["mean"]
        ):
            best[f] = k
    return sorted((k.name for k in best.values()), key=lambda n: summary[n]["change_vs_today"]["mean"])


def combined_recipe(names: list[str]) -> dict[str, Any]:
    """The baseline with the named knobs' fields."""
    out: dict[str, Any] = dict(BASELINE_RECIPE)
    for k in KNOBS:
        if k.name in names:
            out.update(k.recipe)
    return out


def knob_steps(knob: Knob, steps: int) -> int:
    return round(steps * knob.steps_factor) if knob.steps_factor else steps


def choose(summary: dict[str, dict[str, Any]], today_steps: int) -> dict[str, Any]:
    """The recipe `CHOICE_RULE` picks from the study's summaries."""
    budgets = sorted(
        [(today_steps, TODAY)]
        + [(knob_steps(k, today_steps), k.name) for k in KNOBS if k.steps_factor and k.name in summary]
    )
    steps = next((n for n, name in budgets if summary[name]["control_holds"]), today_steps)
    names = adopted(summary)
    if len(names) >= 2 and COMBINED in summary:
        comb, best = (
            summary[COMBINED]["leakage_difference"]["mean"],
            summary[names[0]]["leakage_difference"]["mean"],
        )
        names = names if comb <= best else names[:1]
    elif len(names) >= 2:
        names = names[:1]  # the combination did not run
    return {"knobs": names, "recipe": combined_recipe(names), "steps": steps}


def run_study(
    s: CompareSettings,
    ecfg: EvalConfig,
    n_calibration: int,
    reference_size: int = 256,
    log: Callable[[str], None] = log_line,
    knobs: tuple[Knob, ...] = KNOBS,
) -> dict[str, Any]:
    """Every knob of `knobs` on `n_calibration` calibration sets, then (when two or more data knobs are
    adopted) their combination; the table and the choice of `CHOICE_RULE`."""
    out = Path(ecfg.out)
    sets: list[tuple[str, Path]] = []
    for k in range(n_calibration):
        folder = out / "sets" / f"calibration-{k:02d}"
        sets.append(
            (
                folder.name,
                render_reference_set(folder / "references", SET_SEEDS["calibration"] + k, reference_size),
            )
        )
    rows: list[dict[str, Any]] = [{"set": name} for name, _ in sets]

    def measure(knob: Knob) -> None:
        for row, (name, refs) in zip(rows, sets, strict=True):
            folder = out / "sets" / name
            variants = ("finestyle", "plain") if knob.name == TODAY or knob.steps_factor else ("finestyle",)
            log(f"study: {knob.name} on {name}")
            rep = run_compare(
                replace(
                    s,
                    images=str(refs),
                    variants=variants,
                    recipe={**BASELINE_RECIPE, **knob.recipe},
                    steps=knob_steps(knob, s.steps),
                ),
                replace(ecfg, out=str(folder / knob.name)),
                log,
                cache_dir=folder / "images",
            )
            figs = {v: set_figures(rep["variants"][v]) for v in variants}
            row[knob.name] = {
                "finestyle": figs["finestyle"],
                "plain": figs["plain"] if "plain" in figs else row[TODAY]["plain"],
            }

    ordered = sorted(knobs, key=lambda k: k.name != TODAY)  # the baseline's plain run pairs every data knob
    for knob in ordered:
        measure(knob)
    summary = {k.name: summarise(rows, k.name) for k in ordered}
    names = adopted(summary)
    if len(names) >= 2:
        measure(Knob(COMBINED, " + ".join(names), {k: v for k, v in combined_recipe(names).items()}))
        summary[COMBINED] = summarise(rows, COMBINED)
    choice = choose(summary, s.steps)
    described = {k.name: k.what for k in knobs} | (
        {COMBINED: " + ".join(names)} if COMBINED in summary else {}
    )
    report = {
        "rule": CHOICE_RULE,
        "knobs": {n: {"what": described[n], **summary[n]} for n in summary},
        "choice": choice,
        "sets": rows,
        "settings": {k: getattr(s, k) for k in s.__dataclass_fields__ if k not in ("images", "recipe")},
        "set_seeds": {"calibration": SET_SEEDS["calibration"]},
        "reference_size": reference_size,
        "eval": {"judge": ecfg.judge, "seeds": ecfg.seeds, "steps": ecfg.steps, "n_prompts": ecfg.n_prompts},
    }
    write_json(out / "report.json", report)
    (out / "report.md").write_text(study_markdown(report))
    log(f"study: chose {', '.join(choice['knobs']) or 'today'} at {choice['steps']} steps")
    return report


def _iv(iv: dict[str, Any] | None) -> str:
    if not iv:
        return "—"
    if iv["low"] is None:
        return f"{iv['mean']:+.3f}"
    return f"{iv['mean']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"


def study_markdown(report: dict[str, Any]) -> str:
    """The recipe table: per knob, the paired leakage difference and its change against today's, with
    95% t-intervals over the calibration sets, and the style figures."""
    n = len(report["sets"])
    lines = [
        f"**Choice rule (fixed before the run):** {report['rule']}",
        "",
        f"| knob | leakage difference, FineStyle − plain ({n} sets) | change against today's | "
        "FineStyle style | plain style | plain leakage | FineStyle prompt |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, k in report["knobs"].items():
        lines.append(
            f"| {name}: {k['what']} | {_iv(k['leakage_difference'])} | {_iv(k['change_vs_today'])} | "
            f"{_iv(k['finestyle_style']).lstrip('+')} | {k['plain_style']:.3f} | {k['plain_leakage']:+.3f} | "
            f"{k['finestyle_prompt']:.3f} |"
        )
    c = report["choice"]
    lines += [
        "",
        f"**Chosen:** {', '.join(c['knobs']) or 'today’s recipe'} ({c['recipe'] or 'no change'}), "
        f"{c['steps']} training steps.",
    ]
    return "\n".join(lines) + "\n"
