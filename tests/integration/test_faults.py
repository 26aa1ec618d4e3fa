"""Faults a production run meets: a full disk (here the file-size limit, RLIMIT_FSIZE, which needs no
root and no mount) in export, prepare, train and --add-style ends in one line and exit 2, publishes
nothing half-written, and a re-run with the space back completes and reuses what was finished."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from tests.conftest import EXAMPLES

pytestmark = pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")


def _cli(args, cwd, limit=None):
    def preexec():  # CPython ignores SIGXFSZ: a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "finestyle.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={**os.environ, "FINESTYLE_HOME": str(cwd / "state")},
        preexec_fn=preexec if limit else None,
    )


def test_an_export_into_a_full_disk_fails_in_one_line_and_a_rerun_completes(tmp_path):
    args = ["export", "--base", "builtin:tiny-sd", "--adapter", "none", "--out", "exp", "--no-check-openvino"]
    full = _cli(args, tmp_path, limit=2_000_000)  # the tiny export's UNet weights alone are larger
    assert full.returncode == 2, full.stderr[-2000:]
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "the file-size limit was reached" in lines[0] and "MB free there" in lines[0]
    assert "Traceback" not in full.stderr
    assert not (tmp_path / "exp").exists()  # nothing half-written is published
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exp")]  # nor left beside it
    ok = _cli(args, tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "exp" / "manifest.json").read_text())["files"]


def _one_line_exit_2(p) -> str:
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.strip().splitlines() if x.startswith("error")]  # beside progress lines
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "limit was reached" in lines[0] and "MB free there" in lines[0] and "re-run" in lines[0]
    return lines[0]


PREPARE = [
    "prepare",
    str(EXAMPLES),
    "--style",
    "ink",
    "--out",
    "ds",
    "--resolution",
    "64",
    "--num-beams",
    "1",
]


@pytest.mark.slow
def test_prepare_and_train_into_a_full_disk_keep_what_was_published(tmp_path):
    """prepare: the dataset's arrow file (72 kB) cannot be written; train: its checkpoint (85 kB)
    cannot. Each ends in one line and exit 2, the previous dataset and checkpoint still load, and a
    re-run with the space back completes from where the last one stopped."""
    from datasets import load_from_disk

    grid = [*PREPARE, "--concepts", "grid", "--max-concepts", "2"]
    assert _cli(grid, tmp_path).returncode == 0
    before = load_from_disk(str(tmp_path / "ds"))["text"]
    _one_line_exit_2(_cli([*grid[:-1], "3"], tmp_path, limit=60_000))
    assert load_from_disk(str(tmp_path / "ds"))["text"] == before  # the previous dataset, whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]
    assert _cli([*grid[:-1], "3"], tmp_path).returncode == 0

    train = ["train", "ds", "--base", "builtin:tiny-sd", "--out", "run", "--resolution", "64"]
    train += ["--checkpoint-every", "2", "--sample-steps", "2", "--resume"]
    assert _cli([*train, "--steps", "2"], tmp_path).returncode == 0
    _one_line_exit_2(_cli([*train, "--steps", "4"], tmp_path, limit=60_000))
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-0000002"], ckpts  # the half-written step 4 is not left as a checkpoint
    import torch

    torch.load(tmp_path / "run/checkpoints/step-0000002/training_state.pt", weights_only=True)
    ok = _cli([*train, "--steps", "4"], tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["steps_this_run"] == 2  # resumed at step 2, not started over


@pytest.mark.slow
def test_add_style_into_a_full_disk_leaves_the_export_as_it_was(tmp_path, monkeypatch):
    """--add-style: the style's K/V factors (30 kB) cannot be written; the export still verifies with
    its one style, and a re-run adds it. A disk that clearly lacks the space is refused before anything
    is written, naming what it needed."""
    from finestyle.artifacts.manifest import verify_export

    assert _cli([*PREPARE, "--concepts", "none"], tmp_path).returncode == 0
    train = ["train", "ds", "--base", "builtin:tiny-sd", "--resolution", "64", "--steps", "2", "--no-samples"]
    assert _cli([*train, "--out", "ink"], tmp_path).returncode == 0
    assert _cli([*train, "--out", "chalk", "--seed", "1"], tmp_path).returncode == 0
    exp = ["export", "--base", "builtin:tiny-sd", "--swappable", "--adapter", "ink/adapter", "--name", "ink"]
    assert _cli([*exp, "--out", "studio", "--no-check-openvino"], tmp_path).returncode == 0
    add = ["export", "--add-style", "chalk/adapter", "--name", "chalk", "--to", "studio"]
    _one_line_exit_2(_cli(add, tmp_path, limit=20_000))
    assert sorted(verify_export(tmp_path / "studio")["swappable"]["styles"]) == ["ink"]
    assert not (tmp_path / "studio" / "styles" / "chalk").exists()
    assert not [p for p in tmp_path.iterdir() if ".work-" in p.name]
    assert _cli(add, tmp_path).returncode == 0
    assert sorted(verify_export(tmp_path / "studio")["swappable"]["styles"]) == ["chalk", "ink"]

    # the free-space check, before anything is written (in process: the disk here is not full)
    import finestyle.core.fs as fs
    from finestyle.config import ExportConfig
    from finestyle.core.errors import UserError
    from finestyle.export.steps import run_export

    monkeypatch.setattr(fs, "free_bytes", lambda where: 1_000_000)
    out = tmp_path / "small-disk"
    with pytest.raises(UserError, match=r"export: needs about \d+ MB under .*, 1 MB free there"):
        run_export(ExportConfig(base="builtin:tiny-sd", adapter=None, out=str(out)), log=lambda m: None)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".small-disk")]
