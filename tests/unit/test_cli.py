from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=os.environ.copy(),
    )


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("prepare", "train", "export", "generate", "serve", "run", "demo", "models", "bench"):
        assert cmd in r.stdout, cmd


@pytest.mark.parametrize("cmd", ["prepare", "train", "export", "generate", "serve", "run", "demo"])
def test_each_command_has_help(cmd):
    r = run_cli(cmd, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout and "--help" in r.stdout


def test_models_lists_and_saves(tmp_path):
    r = run_cli("models")
    assert r.returncode == 0 and "builtin:tiny-sd" in r.stdout and "builtin:tiny-blip" in r.stdout
    r = run_cli("models", "save", "builtin:tiny-sd", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model_index.json").exists()


def test_offline_hub_id_exits_2_with_one_line(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    r = run_cli(
        "prepare",
        str(tmp_path),
        "--style",
        "ink",
        "--out",
        str(tmp_path / "o"),
        "--base",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1


def test_bad_option_value_exits_2():
    r = run_cli("train", "x", "--base", "builtin:tiny-sd", "--out", "y", "--rank", "0")
    assert r.returncode == 2 and "train.rank" in r.stderr and "Traceback" not in r.stderr
