"""`--runtime openvino`: parity with onnxruntime, the export's recorded check, the compiled-blob
cache, refusals, and the runtime in generate, serve and eval."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from finestyle.bench.serve import bench_soak
from finestyle.config import EvalConfig, ExportConfig, ServeConfig
from finestyle.eval.run import run_eval
from finestyle.export.steps import run_export
from finestyle.export.swappable import add_style
from finestyle.runtime.generate import GenerationRequest, generate, generate_batch, load_backend
from finestyle.runtime.openvino import OV_IMAGE_MEAN_ATOL, hardware_precision
from tests.conftest import prepare_small_dataset
from tests.integration.test_export import adapter  # noqa: F401  (module fixture reuse)
from tests.integration.test_runtime import export_with_base  # noqa: F401  (module fixture reuse)
from tests.integration.test_server import Server
from tests.integration.test_swappable import adapters, swx  # noqa: F401  (module fixture reuse)

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def export(export_with_base):  # noqa: F811  (the runtime tests' export: an adapter and the base UNet)
    return export_with_base


def _arr(imgs):
    return np.stack([np.asarray(i, dtype=np.float32) for i in imgs]) / 255


def _copy_with(export, dest, edit):
    shutil.copytree(export, dest)
    m = json.loads((dest / "manifest.json").read_text())
    edit(m)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def test_the_export_records_the_openvino_check(export):
    checks = json.loads((export / "manifest.json").read_text())["openvino"]["checks"]
    prec = hardware_precision()
    assert list(checks) == [prec]
    assert checks[prec]["pass"] is True
    assert checks[prec]["mean_abs_diff"] <= OV_IMAGE_MEAN_ATOL == checks[prec]["mean_atol"]


def test_openvino_fp32_matches_onnxruntime(export):
    ov = load_backend(str(export), "openvino", dtype="fp32")
    ort = load_backend(str(export), "onnxruntime")
    assert ov.name == "openvino[CPU,fp32]"
    g = torch.Generator().manual_seed(0)
    for b in (1, 2):
        x, c = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 77, 32, generator=g)
        t = torch.tensor(500)
        assert (ov.unet(x, t, c) - ort.unet(x, t, c)).abs().max() <= 1e-4
        assert (ov.unet_base(x, t, c) - ort.unet_base(x, t, c)).abs().max() <= 1e-4
    # whole images with style guidance and a concept excluded, as onnxruntime draws them
    req = GenerationRequest("a red boat", negative_prompt="trees", steps=3, seed=5, style_guidance=1.5)
    assert np.abs(_arr(generate(ov, req)) - _arr(generate(ort, req))).max() <= 2e-3 + 1 / 255


def test_compiled_blobs_are_reused_by_a_second_load_and_a_new_manifest(export, tmp_path, monkeypatch):
    monkeypatch.setenv("FINESTYLE_OV_CACHE", str(tmp_path / "cache"))
    req = GenerationRequest("a red boat", steps=1, seed=1)
    first = load_backend(str(export), "openvino", dtype="fp32")
    generate(first, req)
    assert (first.parts["unet"].compiles, first.parts["unet"].from_cache) == (1, 0)
    second = load_backend(str(export), "openvino", dtype="fp32")
    generate(second, req)
    assert second.parts["unet"].from_cache == 1
    # a manifest that changes (e.g. a style added) over the same component files does not recompile
    other = _copy_with(export, tmp_path / "other", lambda m: m.update(style="another style"))
    third = load_backend(str(other), "openvino", dtype="fp32")
    generate(third, req)
    assert all(c.from_cache == c.compiles == 1 for k, c in third.parts.items() if k != "unet_base")


def _cli(*args):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "finestyle.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_reduced_precision_without_a_passing_check_is_refused(export, tmp_path):
    prec = hardware_precision()
    failed = _copy_with(
        export, tmp_path / "failed", lambda m: m["openvino"]["checks"][prec].update({"pass": False})
    )
    r = _cli(
        "generate",
        str(failed),
        "a boat",
        "--runtime",
        "openvino",
        "--dtype",
        "bf16",
        "--out",
        str(tmp_path / "x.png"),
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--dtype bf16" in r.stderr and ("failed its" in r.stderr or "no recorded" in r.stderr)
    unchecked = _copy_with(export, tmp_path / "unchecked", lambda m: m.update(openvino=None))
    r = _cli(
        "generate",
        str(unchecked),
        "a boat",
        "--runtime",
        "openvino",
        "--dtype",
        "bf16",
        "--out",
        str(tmp_path / "y.png"),
    )
    assert r.returncode == 2 and "has no recorded OpenVINO bf16 image check" in r.stderr
    # auto on such an export runs, in fp32, and says why
    r = _cli(
        "generate",
        str(unchecked),
        "a boat",
        "--runtime",
        "openvino",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "a.png"),
    )
    assert r.returncode == 0, r.stderr
    assert "openvino[CPU,fp32]" in r.stdout and "running fp32" in r.stderr
    assert Image.open(tmp_path / "a.png").text["finestyle:runtime"] == "openvino[CPU,fp32]"
    r = _cli(
        "generate", "builtin:tiny-sd", "a boat", "--runtime", "openvino", "--out", str(tmp_path / "z.png")
    )
    assert r.returncode == 2 and "runs an export folder" in r.stderr


def test_the_server_serves_through_openvino(export):
    with Server(ServeConfig(export=str(export), runtime="openvino", max_steps=4, max_batch=2)) as s:
        r = httpx.post(
            s.url + "/v1/generate", json={"prompt": "a red boat", "steps": 2, "seed": 3}, timeout=120
        )
        assert r.status_code == 200, r.text
        im = Image.open(io.BytesIO(r.content))
        assert im.text["finestyle:runtime"].startswith("openvino[CPU,")


def test_eval_runs_an_export_through_openvino(tmp_path):
    base_export = tmp_path / "base"
    run_export(
        ExportConfig(base="builtin:tiny-sd", adapter=None, out=str(base_export), device="cpu"),
        log=lambda m: None,
    )
    refs = prepare_small_dataset(tmp_path / "refs")
    cfg = EvalConfig(
        model=str(base_export),
        references=str(refs),
        out=str(tmp_path / "eval"),
        judge="clip:builtin:tiny-clip",
        n_prompts=2,
        seeds=1,
        steps=2,
        batch=2,
        device="cpu",
        runtime="openvino",
        dtype="fp32",
    )
    rep = run_eval(cfg, log=lambda m: None)
    assert rep["tuned_runtime"] == "openvino[CPU,fp32]"
    # the export of the base model, in fp32: the same images as the base model, so no leakage
    assert rep["leakage"] == 0.0


def test_a_swappable_export_runs_on_openvino_in_every_style(swx, adapters, tmp_path):  # noqa: F811
    # the export records its OpenVINO check, as a plain export does (`auto` then says nothing)
    checks = json.loads((swx / "manifest.json").read_text())["openvino"]["checks"]
    prec = hardware_precision()
    assert list(checks) == [prec] and checks[prec]["pass"] is True and checks[prec]["style"] == "ink"
    work = tmp_path / "studio"
    shutil.copytree(swx, work)
    add_style(str(work), str(adapters["chalk"]), "chalk", log=lambda m: None)
    ov = load_backend(str(work), "openvino", dtype="fp32")
    ort = load_backend(str(work), "onnxruntime")
    assert ov.name == "openvino[CPU,fp32],swappable" and ov.styles == ort.styles == ["base", "chalk", "ink"]
    reqs = [
        GenerationRequest("a red boat", steps=3, seed=1, style="ink"),
        GenerationRequest("a red boat", steps=3, seed=1, style="chalk"),
        GenerationRequest("a red boat", steps=3, seed=1, style="base", style_guidance=0.0),
    ]
    mixed = [_arr(x) for x in generate_batch(ov, reqs)]  # one mixed-style UNet batch
    for got, r in zip(mixed, reqs, strict=True):
        assert np.abs(got - _arr(generate(ort, r))).max() <= 1 / 255
    assert np.abs(mixed[0] - mixed[1]).max() > 0.01  # each row really ran in its own style
    # the CLI path that crashed (KeyError: 'unet'), as the README shows it
    r = _cli("generate", str(work), "a red boat", "--style", "chalk", "--runtime", "openvino",
             "--steps", "2", "--out", str(tmp_path / "boat.png"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "no passing" not in r.stderr
    assert Image.open(tmp_path / "boat.png").text["finestyle:runtime"].startswith("openvino[CPU,")
    with Server(ServeConfig(export=str(work), runtime="openvino", max_steps=4)) as s:
        r = httpx.post(
            s.url + "/v1/generate",
            json={"prompt": "a red boat", "steps": 2, "seed": 3, "style": "chalk"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).text["finestyle:runtime"].startswith("openvino[CPU,")


@pytest.mark.slow
def test_the_openvino_server_soak_has_no_errors_no_compiles_under_load_and_flat_memory(export):
    """The server bench's soak on --runtime openvino: start-up compiles every batch size the batcher can
    form, so 4 concurrent clients never wait for a compile; no errors, and resident memory stays flat."""
    r = bench_soak(str(export), "openvino", seconds=40, concurrency=4, steps=2, modes=("on",))
    on = r["runs"]["on"]
    assert on["ok"] >= 20 and on["errors"] == 0, on["codes"]
    assert on["shape_compiles_at_ready"] >= 8, on  # UNet (CFG) and VAE at batch sizes 1..8
    assert on["shape_compiles_during_load"] == 0, on
    assert abs(on["rss_growth"]) < 0.10, on
