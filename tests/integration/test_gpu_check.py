"""`scripts/gpu-check.sh --dry-run`: every step of the GPU check runs on the CPU with the tiny builtins."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest

from tests.conftest import REPO, doc_section

SCRIPT = REPO / "scripts" / "gpu-check.sh"


@pytest.mark.slow
def test_dry_run_executes_every_step_and_writes_the_results(tmp_path):
    """The docs' dry run ("### GPU check"), as written, into this test's folder; the docs' second line
    is the same command without --dry-run, for a GPU machine."""
    block = re.search(r"```bash\n(.*?)```", doc_section("### GPU check"), re.S).group(1)
    dry, real = (shlex.split(ln.split("  #")[0]) for ln in block.strip().splitlines())
    assert dry[0] == "scripts/gpu-check.sh" and dry[1] == "--dry-run" and real == [dry[0], dry[2]]
    out = tmp_path / "gpu-check"
    p = subprocess.run(
        [str(REPO / dry[0]), *dry[1:-1], str(out)], capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    status = {s["step"]: s["status"] for s in res["steps"]}
    steps = ["install", "pytest-gpu", "bench-train", "export", "bench-export", "serve", "sdxl", "sdxl-export"]
    assert list(status) == steps
    for step in steps:
        assert status[step] == "ran", (step, (out / f"{step}.log").read_text()[-2000:])
    figs = res["figures"]
    assert figs["bench-train"]["steps_per_s"] > 0 and figs["bench-train"]["ratio_vs_baseline"] > 0
    assert figs["export"]["parity_unet_max_abs_diff"] < 1e-4
    assert figs["bench-export"]["ort"] == "ran" and figs["bench-export"]["ort_max_abs_diff"] < 1e-3
    assert figs["bench-export"]["trt"].startswith("skipped: ")
    assert figs["serve"]["img_per_s_batching_on"] > 0
    assert figs["sdxl"]["steps_per_s"] > 0 and figs["sdxl"]["ratio_vs_baseline"] > 0
    assert figs["sdxl-export"]["ort"] == "ran" and figs["sdxl-export"]["ort_max_abs_diff"] < 1e-3
    assert res["versions"]["torch"] and res["versions"]["gpu"] is None
    md = (out / "results.md").read_text()
    assert "| bench-export | ran |" in md and "dry run on the CPU" in md


def test_a_missing_wheels_folder_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run(
        [str(SCRIPT), "--wheels", str(tmp_path / "nowhere"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "--download-wheels" in p.stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_step_is_recorded_and_fails_the_report(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "steps.jsonl").write_text(
        json.dumps({"step": "install", "status": "ran", "seconds": 1, "detail": "exit 0"})
        + "\n"
        + json.dumps({"step": "bench-train", "status": "timeout", "seconds": 300, "detail": "exit 124"})
        + "\n"
    )
    p = subprocess.run(
        ["python3", str(REPO / "scripts" / "gpu_check_report.py"), str(out)], capture_output=True, text=True
    )
    assert p.returncode == 1 and "bench-train" in p.stderr
    assert "| bench-train | timeout |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_only_runs_the_selected_steps(tmp_path):
    out = tmp_path / "gpu-check"
    p = subprocess.run(
        [str(SCRIPT), "--dry-run", "--only", "install", str(out)], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    steps = {s["step"]: s for s in json.loads((out / "results.json").read_text())["steps"]}
    assert steps["install"]["status"] == "ran"
    for name in ("pytest-gpu", "bench-train", "export", "bench-export", "sdxl", "sdxl-export"):
        assert steps[name]["status"] == "skipped" and "not selected" in steps[name]["detail"]


WORLD_SCRIPT = REPO / "scripts" / "gpu-world.sh"


@pytest.mark.slow
def test_gpu_world_dry_run_trains_every_model_and_the_cpu_checks_the_packed_weights(tmp_path):
    """The docs' dry run ("### GPU world"), as written, into this test's folder: four models trained,
    packed into one tar with their reports; check.sh measures their gates on the CPU where it lands."""
    import tarfile

    block = re.search(r"```bash\n(.*?)```", doc_section("### GPU world"), re.S).group(1)
    dry, real = (shlex.split(ln.split("  #")[0]) for ln in block.strip().splitlines())
    assert dry[0] == "scripts/gpu-world.sh" and dry[1] == "--dry-run" and real == [dry[0], dry[2]]
    out = tmp_path / "gpu-world"
    p = subprocess.run(
        [str(REPO / dry[0]), *dry[1:-1], str(out)], capture_output=True, text=True, timeout=900
    )
    assert p.returncode in (0, 1), p.stdout[-3000:] + p.stderr[-3000:]
    with tarfile.open(out / "world-models.tar") as tar:
        names = tar.getnames()
        runs = tmp_path / "runs"
        tar.extractall(runs, filter="data")
    for m in ("vae", "sd", "blip", "judge"):
        assert f"{m}/report.json" in names and any(n.startswith(f"{m}/model/") for n in names)
    summary = json.loads((out / "world.json").read_text())
    assert list(summary["models"]) == ["vae", "sd", "blip", "judge"]
    env = {**__import__("os").environ, "PATH": f"{REPO / '.venv' / 'bin'}:{__import__('os').environ['PATH']}"}
    c = subprocess.run(
        ["bash", str(out / "check.sh"), str(runs), "--scale", "0.01"], capture_output=True, text=True, env=env
    )
    assert c.returncode in (0, 1), c.stderr[-2000:]  # 4-step models fail their gates, as they should
    gates = json.loads((runs / "check.json").read_text())["gates"]
    assert {"judge_objects_f1", "sd_prompt_fidelity", "blip_object_recall", "heldout_survives_vae"} <= set(
        gates
    )
    bad = subprocess.run(
        [str(WORLD_SCRIPT), "--wheels", str(tmp_path / "nope"), str(out)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--wheels" in bad.stderr
