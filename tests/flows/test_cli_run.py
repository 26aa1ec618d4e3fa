"""`finestyle run CONFIG.yaml` twice: the second run reuses all three stages (own Prefect, subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_run_twice_reuses_every_stage(tmp_path):
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        str(REPO / "configs" / "example.yaml"),
        "--set",
        f"workdir={tmp_path / 'wd'}",
        "--set",
        "train.steps=4",
        "--set",
        "prepare.concepts=none",
        "--set",
        "export.parity_steps=2",
        "--set",
        "export.with_base_unet=false",
    ]
    env = os.environ.copy()
    env.pop("PREFECT_API_URL", None)
    env["FINESTYLE_HOME"] = str(tmp_path / "state")
    first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, start_new_session=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "prepare built, train trained, export built" in first.stdout
    second = subprocess.run(
        args, capture_output=True, text=True, env=env, timeout=600, start_new_session=True
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "prepare reused, train reused, export reused" in second.stdout
    assert (tmp_path / "wd" / "generated.png").exists()
    bad = subprocess.run(
        [*args[:5], "--set", "train.rank=0"], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and "train.rank" in bad.stderr and "Traceback" not in bad.stderr
