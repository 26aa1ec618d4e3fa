"""`finestyle bench export` on the CPU: every runtime side by side, peaks, shares and the whole image."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("openvino")


@pytest.mark.slow
def test_bench_export_prints_every_runtime_against_its_peak(tmp_path):
    out = tmp_path / "b.json"
    args = [sys.executable, "-m", "finestyle.cli", "bench", "export", "--model", "builtin:tiny-sd"]
    args += ["--latent", "8", "--iters", "1", "--json", str(out)]
    r = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for label in ("PyTorch eager fp32", "PyTorch bf16", "onnxruntime fp32", "OpenVINO fp32"):
        assert label in r.stdout
    assert "OpenVINO" in r.stdout and "vs onnxruntime fp32:" in r.stdout and "whole image (64 px" in r.stdout
    (res,) = json.loads(out.read_text())
    assert res["cpu"] and res["matmul_fp32_gflops"] > 0 and res["matmul_bf16_gflops"] > 0
    rows = {row["key"]: row for row in res["runtimes"]}
    assert {"torch_fp32_s", "torch_bf16_weights_s", "ort_fp32_s", "openvino_fp32_s"} <= set(rows)
    assert rows["openvino_fp32_s"]["rel_diff"] < 1e-4  # the same graph in fp32
    for row in rows.values():
        assert row["ms"] > 0 and 0 < row["share_of_peak"] and row["vs_eager_fp32"] > 0
    assert res["whole_image"]["seconds"] > 0 and res["whole_image"]["steps"] == 20
