"""The verdict over reference sets: the paired t-interval, the decision rule and the positive control."""

from __future__ import annotations

import numpy as np
import pytest

from finestyle.eval.verdict import DECISION_RULE, decide, t_interval, t_quantile, verdict_markdown


def test_t_quantiles_match_the_tables():
    for df, table in ((1, 12.706), (2, 4.303), (4, 2.776), (11, 2.201), (30, 2.042)):
        assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)


def test_the_paired_t_interval_over_sets():
    x = [0.1, -0.2, 0.05, -0.1, 0.0]
    iv = t_interval(x)
    half = 2.776 * np.std(x, ddof=1) / np.sqrt(5)
    assert iv["mean"] == pytest.approx(np.mean(x))
    assert (iv["low"], iv["high"]) == pytest.approx((np.mean(x) - half, np.mean(x) + half), abs=1e-3)
    assert t_interval([0.3])["low"] is None  # one set: no interval
    assert t_interval([0.2] * 4)["low"] == t_interval([0.2] * 4)["high"] == pytest.approx(0.2)


def _set(fs_style, fs_leak, pl_style, pl_leak):
    return {
        "finestyle": {"style_fidelity": fs_style, "leakage": fs_leak, "prompt_fidelity": 0.8},
        "plain": {"style_fidelity": pl_style, "leakage": pl_leak, "prompt_fidelity": 0.7},
    }


CAL_OK = [_set(0.7, 0.05, 0.8, 0.2)] * 3


def test_no_verdict_when_the_positive_control_fails():
    test = [_set(0.8, 0.0, 0.8, 0.3), _set(0.8, 0.01, 0.8, 0.25), _set(0.8, 0.0, 0.8, 0.3)]
    # plain tuning learned no style on the calibration sets: whatever the test sets say, no verdict
    v = decide([_set(0.0, 0.0, 0.1, 0.3)] * 3, test)
    assert v["outcome"] == "no verdict" and "did not learn the style" in v["why"]
    v = decide([_set(0.8, 0.0, 0.8, 0.02)] * 3, test)
    assert v["outcome"] == "no verdict" and "did not leak" in v["why"]
    assert decide([], test)["outcome"] == "no verdict"
    # the same test sets under a control that holds: FineStyle wins
    assert decide(CAL_OK, test)["outcome"] == "FineStyle wins"


def test_the_decision_rule():
    less = [_set(0.75, 0.02, 0.8, 0.2), _set(0.7, 0.05, 0.75, 0.25), _set(0.8, 0.05, 0.8, 0.2)]
    v = decide(CAL_OK, less)
    assert v["outcome"] == "FineStyle wins" and v["paired"]["leakage"]["high"] < 0
    # the interval crosses 0: not a win
    mixed = [_set(0.8, 0.3, 0.8, 0.1), _set(0.8, 0.0, 0.8, 0.2), _set(0.8, 0.1, 0.8, 0.12)]
    v = decide(CAL_OK, mixed)
    assert v["outcome"] == "FineStyle does not win" and "does not lie below 0" in v["why"]
    # less leakage bought with the style: not a win either
    styleless = [_set(0.5, 0.0, 0.8, 0.2), _set(0.55, 0.01, 0.8, 0.2), _set(0.5, 0.0, 0.8, 0.22)]
    v = decide(CAL_OK, styleless)
    assert v["outcome"] == "FineStyle does not win" and "style fidelity" in v["why"]
    assert decide(CAL_OK, less[:1])["outcome"] == "no verdict"  # one test set: no interval
    md = verdict_markdown(decide(CAL_OK, less))
    assert DECISION_RULE in md and "**Verdict: FineStyle wins**" in md
