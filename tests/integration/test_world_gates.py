"""The shipped world models, measured on fresh seeds: a fast subset of `finestyle world check`.

The published figures come from the full-size check (README, "A world where quality is measurable");
these smaller samples guard against a regression of the shipped weights or of the code that reads them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from finestyle.core.models import SHA256SUMS, weights_dir

pytestmark = pytest.mark.skipif(
    not all((weights_dir() / f"world-{m}" / SHA256SUMS).is_file() for m in ("sd", "blip", "judge")),
    reason="the world builtins' weights are not installed (finestyle world train / install)",
)


def test_world_check_fast_subset(tmp_path):
    out = tmp_path / "gates.json"
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "world", "check", "--only", "judge", "--only", "blip", "--only", "sd",
         "--scale", "0.2", "--json", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode in (0, 1), r.stderr
    report = json.loads(out.read_text())
    g = {k: v["value"] for k, v in report["gates"].items()}
    assert set(report) >= {"gates", "passed", "cpu"}
    assert report["passed"] == all(v["pass"] for v in report["gates"].values())
    # every figure is printed in the table, pass or fail
    for name in g:
        assert name in r.stdout
    assert g["judge_style_accuracy"] >= 0.95
    assert g["judge_objects_f1"] >= 0.85
    # a regression guard for the shipped weights, below their full-size figures by the sampling noise
    # of 40 renders: the duotone world's world-blip measured recall 0.628, precision 0.668 on 200
    # (its goal, 0.80, fails: see its model card)
    assert g["blip_object_precision"] >= 0.55 and g["blip_object_recall"] >= 0.5
    # world-sd shipped 2026-12-07: prompt fidelity 0.755 and style fidelity 0.915 on 200 images
    assert g["sd_prompt_fidelity"] >= 0.6
    assert g["sd_style_fidelity"] >= 0.75
    assert g["sd_heldout_unknown"] <= 0.3
