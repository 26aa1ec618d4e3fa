"""`finestyle run CONFIG.yaml` (own Prefect, subprocess), and the demo as the README shows it. A second
run reusing every stage across processes is checked on the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, doc_section


@pytest.mark.slow
def test_run_builds_every_stage_and_refuses_a_bad_override(tmp_path):
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
        "--set",
        "export.check_bf16=false",
        "--set",
        "export.check_openvino=false",
    ]
    env = os.environ.copy()
    env.pop("PREFECT_API_URL", None)
    env["FINESTYLE_HOME"] = str(tmp_path / "state")
    first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, start_new_session=True)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "prepare built, train trained, export built" in first.stdout
    assert (tmp_path / "wd" / "generated.png").exists()
    bad = subprocess.run(
        [*args[:5], "--set", "train.rank=0"], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and "train.rank" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_readme_demo_command_runs_clean_and_reuses(tmp_path):
    """The README's main job, `finestyle demo`, as written (in a fresh folder): it prints its own
    progress and results, no traceback, warning, progress bar or bytecode listing; a second run
    reuses every stage."""
    from pathlib import Path

    exe = Path(sys.executable).parent / "finestyle"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    runs = [
        subprocess.run([str(exe), "demo"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
        for _ in range(2)
    ]
    first, second = runs
    assert first.returncode == 0, first.stderr[-3000:]
    assert "prepare built, train trained, export built" in first.stdout
    assert (tmp_path / "runs" / "demo" / "generated.png").is_file()
    for r in runs:
        text = r.stdout + r.stderr
        for noise in (
            "Traceback",
            "Warning",
            "LOAD_GLOBAL",
            "RESUME",
            "Loading pipeline components",
            "Saving the dataset",
            "Flow run",  # Prefect's bookkeeping: run names, states, the temporary server
            "Task run",
            "temporary server",
        ):
            assert noise not in text, (noise, text[-3000:])
    # FineStyle's own account of each stage, one line each, and what the pictures are
    lines = first.stderr.splitlines() + first.stdout.splitlines()
    assert any(x.startswith("prepare: ") and " rows from " in x for x in lines), first.stderr
    assert any(x.startswith("train: ") and " loss " in x for x in lines), first.stdout
    assert any(x.startswith("export: parity ") for x in lines), first.stderr
    assert "have random weights" in first.stdout and "finestyle world render" in first.stdout
    assert second.returncode == 0 and "prepare reused, train reused, export reused" in second.stdout
    # the offline eval example ("## The two commands", getting started), as written, on the demo's export
    readme = doc_section("## The two commands", page="docs/getting-started.md")
    line = next(x for x in readme.splitlines() if x.startswith("finestyle eval runs/demo/export"))
    ev = subprocess.run(
        [str(exe), *line.split()[1:]], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "eval: base model: 8/8 images (" in ev.stdout and " eta " in ev.stdout  # progress with an ETA
    rep = json.loads((tmp_path / "runs/demo/eval/report.json").read_text())
    assert rep["n_images"] == 8 and rep["judge"]["kind"] == "clip" and rep["concepts"]
    verbose = subprocess.run(
        [str(exe), "--verbose", "models"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert verbose.returncode == 0 and "builtin:tiny-sd" in verbose.stdout


def test_quiet_mode_shows_finestyle_lines_and_mutes_sqlalchemy_pool(tmp_path, monkeypatch):
    from prefect.logging.configuration import load_logging_config

    from flows.cli import _quiet_prefect_server

    monkeypatch.setenv("FINESTYLE_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_LOGGING_SETTINGS_PATH", raising=False)
    monkeypatch.setenv("FINESTYLE_QUIET", "1")
    _quiet_prefect_server()
    path = os.environ["PREFECT_LOGGING_SETTINGS_PATH"]
    cfg = load_logging_config(tmp_path / "prefect-logging.yml")
    assert path == str(tmp_path / "prefect-logging.yml")
    assert cfg["loggers"]["sqlalchemy.pool"]["level"] == "CRITICAL"
    assert "prefect" in cfg["loggers"] and cfg["root"]["level"] == "WARNING"  # Prefect's own, kept
    console = cfg["handlers"]["console"]
    assert console["formatter"] == "finestyle" and console["filters"] == ["finestyle_lines"]
    import logging

    from flows.cli import FinestyleLines

    keep = FinestyleLines()

    def rec(msg, level=logging.INFO):
        return logging.LogRecord("prefect.task_runs", level, "", 0, msg, None, None)  # noqa: E731

    assert keep.filter(rec("prepare: 27 rows from 4 image(s) -> runs/demo/dataset"))
    assert not keep.filter(rec("Finished in state Completed()"))
    assert keep.filter(rec("something went wrong", logging.WARNING))
    monkeypatch.setenv("PREFECT_LOGGING_SETTINGS_PATH", "/mine.yml")  # the user's own wins
    _quiet_prefect_server()
    assert os.environ["PREFECT_LOGGING_SETTINGS_PATH"] == "/mine.yml"
