"""`finestyle bench serve` end to end with small numbers: a real server process under real load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_serve_reports_both_modes_and_survives_the_flood(tmp_path):
    out = tmp_path / "serve.json"
    args = [sys.executable, "-m", "finestyle.cli", "bench", "serve", "--requests", "2", "--steps", "1"]
    args += ["--size", "32", "--time-limit", "60", "--json", str(out)]
    env = os.environ.copy()
    env["FINESTYLE_HOME"] = str(tmp_path / "state")
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "batching on/off images/s: c=1:" in r.stdout
    res = json.loads(out.read_text())
    for mode in ("on", "off"):
        rows = res["levels"][mode]
        assert [x["concurrency"] for x in rows] == [1, 2, 4, 8]
        assert all(x["errors"] == 0 and x["ok"] == x["requests"] > 0 for x in rows), rows
    flood = res["overload"]
    assert (
        flood["server_alive"] and flood["only_503_beyond_queue"] and 503 in {int(k) for k in flood["codes"]}
    )
    assert res["batching_ratio_at_max_concurrency"] > 0


@pytest.mark.slow
def test_bench_serve_styles_reports_the_step_ratio_mixed_batches_and_disk(tmp_path):
    out = tmp_path / "styles.json"
    args = [sys.executable, "-m", "finestyle.cli", "bench", "serve", "--styles", "2", "--requests", "8"]
    args += ["--steps", "1", "--concurrency", "4", "--time-limit", "30", "--json", str(out)]
    env = dict(os.environ, FINESTYLE_HOME=str(tmp_path / "state"))
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x the merged step (goal <= 1.05x)" in r.stdout and "styles mixed" in r.stdout
    res = json.loads(out.read_text())
    assert res["unet_step_kv_s"] > 0 and res["unet_step_merged_s"] > 0 and res["project_kv_per_request_s"] > 0
    assert res["serve_mixed_styles"]["errors"] == 0 and res["serve_mixed_styles"]["ok"] == 8
    assert res["disk_n_merged_bytes_computed"] == 2 * res["disk_one_merged_export_bytes"]
    assert res["disk_one_style_bytes"] < res["disk_swappable_bytes"] / 100
    sw, one = res["memory_swappable_server"], res["memory_one_merged_server"]
    assert 0 < sw["rss_bytes"] <= sw["peak_rss_bytes"] and 0 < one["rss_bytes"] <= one["peak_rss_bytes"]
    assert res["memory_n_merged_servers_rss_bytes_computed"] == 2 * one["rss_bytes"]
    assert "server memory after one request" in r.stdout


def test_bench_train_reports_each_variant_against_the_baseline_and_the_cpu_peak(tmp_path):
    out = tmp_path / "train.json"
    args = [sys.executable, "-m", "finestyle.cli", "bench", "train", "--base", "builtin:tiny-sd"]
    args += ["--resolution", "64", "--steps", "2", "--variants", "baseline,cached", "--json", str(out)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"baseline", "cached"}
    assert res["results"]["baseline"]["ratio_vs_baseline"] == 1.0
    peaks = res["cpu_matmul_peak_tflops"]
    assert peaks["fp32"] > 0
    cached = res["results"]["cached"]
    assert cached["mfu"] == pytest.approx(cached["unet_tflops"] / peaks["fp32"])
    assert "of the CPU's measured matmul peak" in r.stdout
    # the last step's profile: ten ops by self time, the UNet's convolutions and matmuls among them
    ops = cached["top_ops"]
    assert len(ops) == 10 and all(o["self_cpu_ms"] > 0 for o in ops)
    assert any(
        o["op"].startswith(("aten::convolution", "aten::mkldnn", "aten::mm", "aten::addmm", "aten::bmm"))
        or "conv" in o["op"]
        or "mm" in o["op"]
        for o in ops
    ), ops
    assert "top ops (last step, self time):" in r.stdout
    bad = subprocess.run([*args[:-4], "--variants", "cached,turbo"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--variants 'cached,turbo'" in bad.stderr
