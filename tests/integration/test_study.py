"""`finestyle eval --compare --study`, run as the recipe study's page shows it (fewer sets, knobs and
steps): each knob's FineStyle data obeys its recipe, every knob is paired with plain tuning on the same
set, and the table and choice follow the rule."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_readme_commands import readme_commands, run, small_sets, world_or_tiny

pytestmark = pytest.mark.slow


def test_recipe_study_command(tmp_path):
    from datasets import load_from_disk

    (argv,) = readme_commands("## Running the recipe study")
    argv = world_or_tiny(argv)
    argv[argv.index("--calibration-sets") + 1] = "2"
    small = small_sets(reference_size=96)
    p = run([*argv, *small, "--knobs", "context,budget", "--device", "cpu"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "runs/recipe-study"
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["knobs"]) == ["today", "context", "budget"]
    assert [r["set"] for r in rep["sets"]] == ["calibration-00", "calibration-01"]
    for r in rep["sets"]:
        # a data knob is paired with today's plain run on the same set; the budget knob trains its own
        assert r["context"]["plain"] == r["today"]["plain"]
        run_dir = out / "sets" / r["set"]
        assert json.loads((run_dir / "budget/runs/plain/report.json").read_text())["steps"] == 6
        # the context knob's FineStyle rows keep context: a concept fills at most 60% of its crop's side
        rows = [
            x
            for x in load_from_disk(str(run_dir / "context/datasets/attention-recipe"))
            if x["method"] == "attention"
        ]
        assert rows
        for x in rows:
            (x0, y0, x1, y1), (cx0, cy0, cx1, cy1) = x["bbox"], x["crop"]
            assert (x1 - x0) <= 0.6 * (cx1 - cx0) + 1 or cx1 - cx0 == 96, x
            assert (y1 - y0) <= 0.6 * (cy1 - cy0) + 1 or cy1 - cy0 == 96, x
        # the baseline is the pre-study recipe whatever the defaults: one crop per concept
        base = [
            x
            for x in load_from_disk(str(run_dir / "today/datasets/attention-recipe"))
            if x["method"] == "attention"
        ]
        assert len(base) == len(rows)  # both cut one crop per concept; context's is never smaller
        area = lambda c: (c[2] - c[0]) * (c[3] - c[1])  # noqa: E731
        assert all(area(x["crop"]) >= area(b["crop"]) for x, b in zip(rows, base, strict=True))
    k = rep["knobs"]["context"]
    diffs = [r["context"]["finestyle"]["leakage"] - r["context"]["plain"]["leakage"] for r in rep["sets"]]
    today = [r["today"]["finestyle"]["leakage"] - r["today"]["plain"]["leakage"] for r in rep["sets"]]
    assert k["leakage_difference"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert k["change_vs_today"]["mean"] == pytest.approx((sum(diffs) - sum(today)) / 2)
    assert rep["choice"]["steps"] in (2, 6) and set(rep["choice"]["knobs"]) <= {"context"}
    md = (out / "report.md").read_text()
    assert "Choice rule (fixed before the run)" in md and "**Chosen:**" in md
    assert "**Chosen:**" in p.stdout
    # --study with --sets, or with a recipe option, or --knobs alone: one line, exit 2
    for bad in (
        [*argv, "--sets", "2"],
        [*argv, "--concept-share", "0.6"],
        ["finestyle", "eval", "--knobs", "x", "--out", "o"],
    ):
        p = run(bad, tmp_path)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
