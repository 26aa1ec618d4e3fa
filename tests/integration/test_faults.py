"""Faults a production run meets: a full disk (here the file-size limit, RLIMIT_FSIZE, which needs no
root and no mount) ends in one line and exit 2, publishes nothing half-written, and a re-run with the
space back completes."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

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
