"""The recipe study's choice rule: budget by the positive control, data knobs by the paired leakage change."""

from __future__ import annotations

import pytest

from finestyle.eval.study import BASELINE_RECIPE, COMBINED, TODAY, adopted, choose, study_markdown, summarise


def _v(style, leak):
    return {"style_fidelity": style, "leakage": leak, "prompt_fidelity": 0.5}


def _rows(knobs: dict[str, list[tuple[float, float, float, float]]]) -> list[dict]:
    """knob -> per set (FineStyle style, FineStyle leakage, plain style, plain leakage)."""
    n = len(next(iter(knobs.values())))
    return [
        {"set": f"calibration-{i:02d}"}
        | {k: {"finestyle": _v(*v[i][:2]), "plain": _v(*v[i][2:])} for k, v in knobs.items()}
        for i in range(n)
    ]


PLAIN = (0.3, 0.05)  # plain tuning at today's budget: the positive control fails


def test_a_knob_is_adopted_only_when_it_lowers_the_paired_leakage_difference_and_style_holds():
    rows = _rows(
        {
            TODAY: [(0.3, 0.10, *PLAIN), (0.3, 0.12, *PLAIN), (0.3, 0.08, *PLAIN)],
            "context": [(0.3, 0.06, *PLAIN), (0.3, 0.09, *PLAIN), (0.3, 0.05, *PLAIN)],  # -0.033
            "multi-scale": [(0.3, 0.03, *PLAIN), (0.3, 0.07, *PLAIN), (0.3, 0.05, *PLAIN)],  # -0.05
            "naming": [(0.1, 0.00, *PLAIN), (0.1, 0.00, *PLAIN), (0.1, 0.00, *PLAIN)],  # style lost
            "whole-image": [(0.3, 0.11, *PLAIN), (0.3, 0.13, *PLAIN), (0.3, 0.09, *PLAIN)],  # worse
        }
    )
    summary = {k: summarise(rows, k) for k in (TODAY, "context", "multi-scale", "naming", "whole-image")}
    assert summary["context"]["change_vs_today"]["mean"] == pytest.approx(-0.1 / 3)
    assert summary["naming"]["style_holds"] is False and summary["whole-image"]["change_vs_today"]["mean"] > 0
    # context and multi-scale set one field: only the better (multi-scale) is adopted
    assert adopted(summary) == ["multi-scale"]
    c = choose(summary, 300)
    # the chosen recipe is the whole recipe: the baseline with the adopted knobs' fields
    want = BASELINE_RECIPE | {"concept_share": [0.6, 0.3]}
    assert c == {"knobs": ["multi-scale"], "recipe": want, "steps": 300}


def test_the_combination_is_chosen_only_when_it_is_no_worse_than_the_best_knob():
    base = {
        TODAY: [(0.3, 0.10, *PLAIN), (0.3, 0.12, *PLAIN)],
        "context": [(0.3, 0.05, *PLAIN), (0.3, 0.07, *PLAIN)],  # -0.05
        "whole-image": [(0.3, 0.08, *PLAIN), (0.3, 0.10, *PLAIN)],  # -0.02
    }
    for comb, want in ((0.04, ["context", "whole-image"]), (0.09, ["context"])):
        rows = _rows(base | {COMBINED: [(0.3, comb, *PLAIN), (0.3, comb, *PLAIN)]})
        summary = {k: summarise(rows, k) for k in (TODAY, "context", "whole-image", COMBINED)}
        c = choose(summary, 300)
        assert c["knobs"] == want
        both = BASELINE_RECIPE | {"concept_share": [0.6], "whole_image_weight": 3.0}
        assert c["recipe"] == (both if len(want) == 2 else BASELINE_RECIPE | {"concept_share": [0.6]})


def test_the_budget_is_the_smallest_at_which_the_positive_control_holds():
    today = [(0.3, 0.1, *PLAIN), (0.3, 0.1, *PLAIN)]
    for plain_budget, want in (((0.6, 0.2), 900), ((0.6, 0.05), 300), ((0.4, 0.2), 300)):
        rows = _rows({TODAY: today, "budget": [(0.5, 0.1, *plain_budget)] * 2})
        summary = {k: summarise(rows, k) for k in (TODAY, "budget")}
        assert choose(summary, 300)["steps"] == want
        assert choose(summary, 300)["knobs"] == []  # no data knob ran: today's recipe stays
    # and the table says so, with the rule
    md = study_markdown(
        {
            "rule": "RULE",
            "knobs": {k: {"what": k} | summary[k] for k in summary},
            "choice": choose(summary, 300),
            "sets": rows,
        }
    )
    assert "**Choice rule (fixed before the run):** RULE" in md and "300 training steps" in md
