"""The FineStyle verdict over many reference sets: paired per-set differences, a t-interval over the sets,
a decision rule fixed before any run, and a positive control on sets kept apart from the test sets.

Each reference set trains every variant with the same seed, steps, rank and learning rate; a set's
difference is FineStyle's figure minus plain tuning's on that set. The sets, not the images, are the
independent draws, so the interval is Student's t over the sets.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

STYLE_MARGIN = 0.10
"""FineStyle's mean style fidelity may be at most this far below plain tuning's."""
CONTROL_STYLE = 0.5
"""Positive control: plain tuning's mean style fidelity on the calibration sets, at least."""
CONTROL_LEAKAGE = 0.10
"""Positive control: plain tuning's mean reference leakage (excess over the control) on the calibration
sets, at least."""
CONFIDENCE = 0.95

DECISION_RULE = (
    f"FineStyle wins when the upper bound of the {CONFIDENCE:.0%} t-interval of its per-set leakage "
    f"difference (FineStyle minus plain, over the test sets) is below 0, and its mean style fidelity is "
    f"at most {STYLE_MARGIN:.2f} below plain's. Before any verdict, the positive control must hold on the "
    f"calibration sets: plain tuning learns the style (mean style fidelity >= {CONTROL_STYLE:.2f}) and "
    f"leaks (mean leakage >= +{CONTROL_LEAKAGE:.2f}); otherwise the result is 'no verdict'."
)


def _t_cdf(x: float, df: int) -> float:
    """Student's t CDF at x >= 0 (Simpson's rule on the density; exact to ~1e-9 for the quantiles used)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    n = 4000
    h = x / n
    total = 0.0
    for i in range(n + 1):
        w = 1 if i in (0, n) else (4 if i % 2 else 2)
        total += w * c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2)
    return 0.5 + total * h / 3


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom, by bisection."""
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: list[float] | np.ndarray, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean and two-sided t-interval of independent per-set values (no interval for fewer than 2)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = t_quantile(0.5 + confidence / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def _mean(sets: list[dict[str, dict[str, float]]], variant: str, key: str) -> float:
    return float(np.mean([s[variant][key] for s in sets])) if sets else float("nan")


def decide(
    calibration: list[dict[str, dict[str, float]]],
    test: list[dict[str, dict[str, float]]],
    ours: str = "finestyle",
    theirs: str = "plain",
) -> dict[str, Any]:
    """The verdict: each set maps variant -> {style_fidelity, leakage, prompt_fidelity, ...}.

    Returns the positive control, the paired intervals over the test sets and the outcome: "FineStyle
    wins", "FineStyle does not win" (with why) or "no verdict" (with why)."""
    control = {
        "sets": len(calibration),
        "plain_style_fidelity": _mean(calibration, theirs, "style_fidelity"),
        "plain_leakage": _mean(calibration, theirs, "leakage"),
    }
    control["passed"] = bool(
        calibration
        and control["plain_style_fidelity"] >= CONTROL_STYLE
        and control["plain_leakage"] >= CONTROL_LEAKAGE
    )
    keys = sorted({k for s in test for k in s[ours] if isinstance(s[ours][k], int | float)} & {
        k for s in test for k in s[theirs] if isinstance(s[theirs][k], int | float)
    })  # fmt: skip
    paired = {
        k: t_interval([s[ours][k] - s[theirs][k] for s in test if k in s[ours] and k in s[theirs]])
        for k in keys
    }
    means = {
        v: {k: _mean(test, v, k) for k in ("style_fidelity", "leakage", "prompt_fidelity")}
        for v in (ours, theirs)
    }
    out = {
        "rule": DECISION_RULE,
        "positive_control": control,
        "paired": paired,
        "means": means,
        "test_sets": len(test),
    }
    if not control["passed"]:
        why = []
        if not calibration:
            why.append("no calibration sets")
        else:
            if not control["plain_style_fidelity"] >= CONTROL_STYLE:
                why.append(
                    f"plain tuning did not learn the style ({control['plain_style_fidelity']:.3f} < {CONTROL_STYLE:.2f})"
                )
            if not control["plain_leakage"] >= CONTROL_LEAKAGE:
                why.append(
                    f"plain tuning did not leak ({control['plain_leakage']:+.3f} < +{CONTROL_LEAKAGE:.2f})"
                )
        return {**out, "outcome": "no verdict", "why": "positive control failed: " + "; ".join(why)}
    leak = paired.get("leakage", {})
    if len(test) < 2 or leak.get("high") is None:
        return {
            **out,
            "outcome": "no verdict",
            "why": f"{len(test)} test set(s): an interval needs 2 or more",
        }
    style_ok = means[ours]["style_fidelity"] >= means[theirs]["style_fidelity"] - STYLE_MARGIN
    if leak["high"] < 0 and style_ok:
        return {
            **out,
            "outcome": "FineStyle wins",
            "why": f"leakage difference {_iv(leak)} is below 0 and style holds",
        }
    why = []
    if not leak["high"] < 0:
        why.append(f"leakage difference {_iv(leak)} does not lie below 0")
    if not style_ok:
        why.append(
            f"style fidelity {means[ours]['style_fidelity']:.3f} is more than {STYLE_MARGIN:.2f} below "
            f"plain's {means[theirs]['style_fidelity']:.3f}"
        )
    return {**out, "outcome": "FineStyle does not win", "why": "; ".join(why)}


def _iv(iv: dict[str, Any]) -> str:
    return f"{iv['mean']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"


def verdict_markdown(v: dict[str, Any]) -> str:
    """The verdict as the report shows it: the rule, the control, the paired table and the outcome."""
    c = v["positive_control"]
    lines = [
        f"**Decision rule (fixed before the run):** {v['rule']}",
        "",
        f"**Positive control** ({c['sets']} calibration sets): plain style fidelity "
        f"{c['plain_style_fidelity']:.3f}, plain leakage {c['plain_leakage']:+.3f}: "
        + ("holds." if c["passed"] else "fails."),
        "",
        f"| paired difference, FineStyle − plain, over {v['test_sets']} test sets | mean | {CONFIDENCE:.0%} t-interval |",
        "|---|---|---|",
    ]
    for k, iv in v["paired"].items():
        span = "—" if iv["low"] is None else f"[{iv['low']:+.3f}, {iv['high']:+.3f}]"
        lines.append(f"| {k.replace('_', ' ')} | {iv['mean']:+.3f} | {span} |")
    lines += ["", f"**Verdict: {v['outcome']}** — {v['why']}."]
    return "\n".join(lines) + "\n"
