"""`finestyle export --quantize int8`: an NNCF int8 UNet for OpenVINO beside the fp32 graph, hashed in
the manifest, with its quality guard; `--dtype auto` picks it only when the guard passed, and
`--dtype int8` without a passing guard is refused with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from finestyle.artifacts.manifest import verify_export
from finestyle.config import ExportConfig
from finestyle.core.env import INT8_CPU_FLAGS, cpu_flags
from finestyle.export.steps import run_export

pytestmark = pytest.mark.slow
pytest.importorskip("nncf")
pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "e"
    run_export(ExportConfig(base="builtin:tiny-sd", adapter=None, out=str(out)), log=lambda m: None)
    return out


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
        env=os.environ.copy(),
    )


def test_quantize_guard_auto_and_refusal(export, tmp_path):
    work = tmp_path / "q"
    shutil.copytree(export, work)
    p = _cli(
        "export",
        "--quantize",
        "int8",
        "--to",
        str(work),
        "--calibration-prompts",
        "2",
        "--calibration-steps",
        "4",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "export: int8 UNet added" in p.stdout and "Statistics collection" not in p.stdout + p.stderr
    m = verify_export(work)  # the new files are hashed: the export still verifies
    assert {"openvino/unet_int8/model.xml", "openvino/unet_int8/model.bin"} <= set(m["files"])
    rec, guard = m["openvino"]["int8"], m["openvino"]["checks"]["int8"]
    assert rec["mode"] == "hybrid" and rec["fake_quantize_ops"] > 0  # the default mode
    assert rec["calibration"]["unet_calls"] == 2 * 4 and "judged" not in guard  # no world judge here
    assert guard["pass"] is True and guard["mean_abs_diff"] <= guard["mean_atol"] and guard["images"] == 4
    # int8 forced, and auto (int8 only on a CPU with int8 dot products); int8 is within the guard of fp32
    imgs, said = {}, {}
    for dtype in ("int8", "auto", "fp32"):
        out = tmp_path / f"{dtype}.png"
        g = _cli(
            "generate",
            str(work),
            "a red boat",
            "--runtime",
            "openvino",
            "--dtype",
            dtype,
            "--steps",
            "4",
            "--seed",
            "3",
            "--out",
            str(out),
            cwd=tmp_path,
        )
        assert g.returncode == 0, g.stderr[-2000:]
        imgs[dtype] = np.asarray(Image.open(out), dtype=np.float32) / 255
        said[dtype] = g.stdout + g.stderr
    assert "openvino[CPU,int8]" in said["int8"] and "openvino[CPU,int8]" not in said["fp32"]
    int8_units = any(f in cpu_flags() for f in INT8_CPU_FLAGS)
    assert ("openvino[CPU,int8]" in said["auto"]) == int8_units, said["auto"]
    assert ("no int8 dot-product units" in said["auto"]) != int8_units
    assert 0 < np.abs(imgs["int8"] - imgs["fp32"]).mean() <= 0.05
    # tampering with the int8 weights is refused like any other file
    bin_ = work / "openvino/unet_int8/model.bin"
    data = bytearray(bin_.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bin_.write_bytes(bytes(data))
    g = _cli(
        "generate",
        str(work),
        "a red boat",
        "--runtime",
        "openvino",
        "--dtype",
        "int8",
        "--out",
        "x.png",
        cwd=tmp_path,
    )
    assert g.returncode == 2 and "Traceback" not in g.stderr, g.stderr[-2000:]


def test_a_failing_guard_marks_int8_unusable(export, tmp_path, monkeypatch):
    import finestyle.export.quantize as Q

    work = tmp_path / "q"
    shutil.copytree(export, work)
    monkeypatch.setattr(Q, "INT8_IMAGE_MEAN_ATOL", 0.0)  # no int8 image can be that close
    r = Q.quantize_export(str(work), prompts=1, steps=2, guard_steps=2, log=lambda m: None, mode="full")
    assert r["guard"]["pass"] is False and r["mode"] == "full"
    m = json.loads((work / "manifest.json").read_text())
    assert m["openvino"]["checks"]["int8"]["pass"] is False
    from finestyle.runtime.openvino import resolve_precision

    assert resolve_precision("auto", m) != "int8"  # auto keeps to float
    g = _cli(
        "generate",
        str(work),
        "a red boat",
        "--runtime",
        "openvino",
        "--dtype",
        "int8",
        "--out",
        "x.png",
        cwd=tmp_path,
    )
    assert g.returncode == 2 and len(g.stderr.strip().splitlines()) == 1
    assert "failed its int8 quality guard" in g.stderr
    # an export that was never quantized: refused the same way
    g = _cli("generate", str(export), "a red boat", "--dtype", "int8", "--out", "x.png", cwd=tmp_path)
    assert g.returncode == 2 and "has no int8 UNet" in g.stderr
    # an unknown mode: one line, before any work
    g = _cli("export", "--quantize", "int8", "--to", str(export), "--quantize-mode", "int4", cwd=tmp_path)
    assert g.returncode == 2 and "--quantize-mode 'int4': use full or hybrid" in g.stderr
    assert len(g.stderr.strip().splitlines()) == 1


def test_bench_export_adds_the_int8_row(tmp_path):
    out = tmp_path / "bench.json"
    p = _cli(
        "bench",
        "export",
        "--model",
        "builtin:tiny-sd",
        "--latent",
        "8",
        "--iters",
        "1",
        "--image-size",
        "64",
        "--int8",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (r,) = json.loads(out.read_text())
    rows = {row["key"]: row for row in r["runtimes"]}
    for key in ("openvino_int8_s", "openvino_int8-full_s"):  # hybrid (the default) and full int8
        assert rows[key]["ms"] > 0 and rows[key]["precision"] == "int8"
    assert r["openvino_int8_rel_diff"] < 1.0 and r["openvino_int8-full_rel_diff"] < 1.0
    assert "OpenVINO int8 hybrid vs OpenVINO" in p.stdout and "OpenVINO int8 full vs OpenVINO" in p.stdout
    # where OpenVINO's float time goes, from its own per-layer counters
    ops, b = r["openvino_ops"], r["openvino_breakdown"]
    assert r["openvino_profiled"] in ("fp32", "bf16") and len(ops["top10_ms"]) <= 10
    assert ops["by_type"]["Convolution"] > 0 and any(k.startswith("Convolution: ") for k in ops["kernels_ms"])
    assert b["conv_ms"] > 0 and 0 < b["ceiling_share_of_peak"]
    assert f"OpenVINO {r['openvino_profiled']} by layer: conv" in p.stdout
    # the whole image on the default runtime (auto's choice here) beside onnxruntime fp32, as a figure
    w = r["whole_image"]
    assert w["size"] == 64 and w["seconds"] > 0 and w["ort_fp32_seconds"] > 0 and "(auto: " in w["runtime"]
    assert w["auto_vs_ort_fp32"] == pytest.approx(w["ort_fp32_seconds"] / w["seconds"])
    assert f"onnxruntime fp32 {w['ort_fp32_seconds']:.2f} s" in p.stdout


def _world_installed() -> bool:
    from finestyle.world.int8 import applies

    return applies({"base_model": "builtin:world-sd"})


@pytest.mark.skipif(not _world_installed(), reason="the world builtins' weights are not installed")
def test_the_world_guard_judges_int8_against_float_on_64_images(tmp_path):
    """The docs' int8 commands on builtin:world-sd: the world's prompts calibrate, and the world's judge
    reads 64 images made with the int8 UNet and at the export's float precision: prompt and style
    fidelity within 0.03 of float, or int8 is marked unusable and `auto` runs float."""
    from finestyle.world.int8 import JUDGED_ATOL, JUDGED_IMAGES, float_precision
    from tests.integration.test_readme_commands import readme_commands

    export, quantize, generate = readme_commands(
        "### int8 on CPU: OpenVINO and NNCF, guarded by measured quality"
    )
    p = _cli(*export[1:], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _cli(*quantize[1:], "--calibration-prompts", "2", "--calibration-steps", "4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    m = verify_export(tmp_path / "exports/world")
    guard = m["openvino"]["checks"]["int8"]
    j = guard["judged"]
    assert j["images"] == JUDGED_IMAGES >= 64 and j["reference"] == float_precision(m)
    for k in ("prompt", "style"):
        assert 0 <= j["int8"][k] <= 1 and j["delta"][k] == pytest.approx(j["int8"][k] - j[j["reference"]][k])
    assert j["pass"] == all(abs(d) <= JUDGED_ATOL + 1e-9 for d in j["delta"].values())
    assert guard["pass"] == (guard["mean_abs_diff"] <= guard["mean_atol"] and j["pass"])
    assert "judged guard" in p.stdout and m["openvino"]["int8"]["calibration"]["prompts"] == 2
    g = _cli(*generate[1:], "--steps", "4", cwd=tmp_path)
    assert g.returncode == 0, g.stderr[-2000:]
    int8_units = any(f in cpu_flags() for f in INT8_CPU_FLAGS)
    assert ("openvino[CPU,int8]" in g.stdout) == (guard["pass"] and int8_units), g.stdout
    assert (tmp_path / "boat.png").is_file()
