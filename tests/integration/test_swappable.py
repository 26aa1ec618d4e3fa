"""Many styles, one UNet: the swappable export, per-style parity, mixed-style batches, hot add, and
the OpenAI-compatible endpoint with the official `openai` client against a live server."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from finestyle.config import ServeConfig, TrainConfig
from finestyle.core.errors import UserError
from finestyle.export.swappable import add_style, remove_style, run_swappable_export
from finestyle.runtime.generate import GenerationRequest, generate, generate_batch, load_backend
from finestyle.train.loop import run_train
from tests.conftest import prepare_small_dataset
from tests.integration.test_server import Server

Q = {"log": lambda m: None}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("swap")
    ds = prepare_small_dataset(root / "data")
    out = {}
    for name, seed in (("ink", 0), ("chalk", 1)):
        cfg = TrainConfig(
            dataset=str(ds),
            base="builtin:tiny-sd",
            out=str(root / name),
            steps=4,
            lr=5e-2,
            resolution=64,
            rank=4,
            samples=False,
            seed=seed,
        )
        out[name] = Path(run_train(cfg, **Q).adapter)
    return out


@pytest.fixture(scope="module")
def swx(adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("swx") / "e"
    run_swappable_export("builtin:tiny-sd", [str(adapters["ink"])], ["ink"], str(out), **Q)
    return out


def _arr(imgs):
    return np.stack([np.asarray(i, dtype=np.float32) for i in imgs]) / 255


def test_the_export_holds_one_kv_unet_and_small_styles_each_proven(swx):
    m = json.loads((swx / "manifest.json").read_text())
    assert m["kind"] == "swappable" and sorted(m["swappable"]["styles"]) == ["ink"]
    assert (swx / "onnx/unet_kv/model.onnx").is_file() and not (swx / "onnx/unet/model.onnx").exists()
    assert m["parity"]["unet_base"]["max_abs_diff"] <= 1e-4
    assert m["parity"]["unet_ink"]["max_abs_diff"] <= 1e-4
    assert m["parity"]["image_ink"]["max_abs_diff"] <= 2e-3
    style_bytes = sum(p.stat().st_size for p in (swx / "styles/ink").rglob("*") if p.is_file())
    assert style_bytes < 100_000  # LoRA factors only (the tiny builtin's)


def test_a_mixed_style_batch_gives_each_request_its_own_image(swx, adapters, tmp_path):
    work = tmp_path / "e"
    import shutil

    shutil.copytree(swx, work)
    add_style(str(work), str(adapters["chalk"]), "chalk", **Q)
    be = load_backend(str(work), "onnxruntime")  # the parity path (auto may pick OpenVINO bf16)
    assert be.styles == ["base", "chalk", "ink"]
    reqs = [
        GenerationRequest("a red boat", steps=3, seed=1, style="ink"),
        GenerationRequest("a red boat", steps=3, seed=1, style="chalk"),
        GenerationRequest("a red boat", steps=3, seed=1, style="base"),
    ]
    together = [_arr(imgs) for imgs in generate_batch(be, reqs)]
    alone = [_arr(generate(be, r)) for r in reqs]
    for a, b in zip(together, alone, strict=True):
        assert np.abs(a - b).max() <= 1 / 255
    # the styles differ from each other: each row really ran in its own style
    assert np.abs(together[0] - together[1]).max() > 0.01 and np.abs(together[0] - together[2]).max() > 0.01
    # torch and onnxruntime agree on a style; style guidance runs (the base is a style)
    pt = load_backend(str(work), "torch")
    assert np.abs(_arr(generate(pt, reqs[0])) - alone[0]).max() <= 2e-3 + 1 / 255
    guided = GenerationRequest("a red boat", steps=3, seed=1, style="ink", style_guidance=2.0)
    assert np.abs(_arr(generate(be, guided)) - alone[0]).max() > 0
    # remove: the style is gone, the others still load
    remove_style(str(work), "chalk", **Q)
    be = load_backend(str(work))
    assert be.styles == ["base", "ink"]
    with pytest.raises(UserError, match="unknown style 'chalk'; this export has: base, ink"):
        generate(be, GenerationRequest("x", steps=1, style="chalk"))


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "finestyle.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS="200"),
        timeout=600,
    )


def test_bad_styles_are_refused_with_one_line(swx, adapters, tmp_path):
    import shutil

    # --add-style into a plain export
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy2(swx / "manifest.json", plain / "manifest.json")
    m = json.loads((plain / "manifest.json").read_text())
    m.update(kind=None, files={})
    (plain / "manifest.json").write_text(json.dumps(m))
    r = _cli("export", "--add-style", str(adapters["chalk"]), "--to", str(plain))
    assert (
        r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a swappable export" in r.stderr
    )
    # a style trained on another base (by fingerprint)
    other = tmp_path / "other-adapter"
    shutil.copytree(adapters["chalk"], other)
    info = json.loads((other / "finestyle_adapter.json").read_text())
    info["base_fingerprint"] = "0" * 64
    (other / "finestyle_adapter.json").write_text(json.dumps(info))
    work = tmp_path / "e"
    shutil.copytree(swx, work)
    r = _cli("export", "--add-style", str(other), "--to", str(work), "--name", "x")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not on this export's base" in r.stderr and not (work / "styles/x").exists()
    # a style file that does not match its hash is refused at load
    (work / "styles/ink/kv_lora.safetensors").write_bytes(b"tampered")
    with pytest.raises(UserError, match="styles/ink/kv_lora.safetensors does not match"):
        load_backend(str(work))


def test_server_styles_openai_client_hot_add_and_admin_token(swx, adapters, tmp_path, monkeypatch):
    import shutil

    import openai

    work = tmp_path / "e"
    shutil.copytree(swx, work)
    monkeypatch.setenv("FINESTYLE_ADMIN_TOKEN", "s3cret")
    with Server(ServeConfig(export=str(work), max_steps=4, max_size=128)) as s:
        models = httpx.get(s.url + "/v1/models").json()
        assert models["object"] == "list" and [d["id"] for d in models["data"]] == ["base", "ink"]
        assert (
            models["data"][1]["style"]
            == json.loads((adapters["ink"] / "finestyle_adapter.json").read_text())["style"]
        )
        # one truth per export: /v1/model and `finestyle concepts` list each style's concepts
        ink = json.loads((work / "manifest.json").read_text())["swappable"]["styles"]["ink"]["concepts"]
        info = httpx.get(s.url + "/v1/model").json()
        assert ink and info["concepts"] == ink and info["style_concepts"] == {"ink": ink}
        out = _cli("concepts", str(work)).stdout
        assert out.startswith("ink: style: ") and ", ".join(ink) in out
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused")
        res = client.images.generate(
            model="ink",
            prompt="a red boat",
            n=2,
            size="64x64",
            response_format="b64_json",
            extra_body={"steps": 2, "seed": 7, "negative_prompt": "trees", "exclude_concepts": ["sun"]},
        )
        assert len(res.data) == 2
        im = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
        assert im.size == (64, 64) and im.text["finestyle:negative_prompt"] == "trees, sun"
        # errors in OpenAI's shape, through the client
        with pytest.raises(openai.NotFoundError) as e:
            client.images.generate(model="nope", prompt="x", extra_body={"steps": 1})
        assert e.value.body["code"] == "model_not_found" and "base, ink" in e.value.body["message"]
        r = httpx.post(s.url + "/v1/images/generations", json={"prompt": "x", "size": "63x64"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "size" and err["type"] == "invalid_request_error"
        r = httpx.post(s.url + "/v1/generate", json={"prompt": "x", "steps": 1, "style": "chalk"})
        assert r.status_code == 404 and r.json()["detail"]["styles"] == ["base", "ink"]
        # hot add: write the style into the served folder, then reload with the admin token
        add_style(str(work), str(adapters["chalk"]), "chalk", **Q)
        assert httpx.post(s.url + "/v1/admin/reload").status_code == 401
        assert (
            httpx.post(s.url + "/v1/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code
            == 401
        )
        r = httpx.post(s.url + "/v1/admin/reload", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["styles"] == ["base", "chalk", "ink"]
        r = httpx.post(
            s.url + "/v1/generate", json={"prompt": "x", "steps": 1, "style": "chalk", "seed": 1}, timeout=60
        )
        assert r.status_code == 200
        m = httpx.get(s.url + "/metrics").text
        assert 'finestyle_style_requests_total{status="200",style="chalk"} 1.0' in m
        assert 'finestyle_style_images_total{style="ink"} 2.0' in m


def test_the_admin_endpoint_does_not_exist_without_a_token(swx, monkeypatch):
    monkeypatch.delenv("FINESTYLE_ADMIN_TOKEN", raising=False)
    with Server(ServeConfig(export=str(swx), max_steps=2)) as s:
        assert (
            httpx.post(s.url + "/v1/admin/reload", headers={"Authorization": "Bearer x"}).status_code == 404
        )


def test_sighup_reloads_the_styles_of_a_running_server(swx, adapters, tmp_path):
    """`finestyle serve` as users run it (its own process, the event loop in the main thread): a style
    added to its folder serves after SIGHUP, without a restart."""
    import shutil
    import signal
    import socket
    import subprocess
    import sys
    import time

    from tests.integration.test_server import wait_ready

    work = tmp_path / "e"
    shutil.copytree(swx, work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "finestyle.cli", "serve", str(work), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(url, 120)
        assert [d["id"] for d in httpx.get(url + "/v1/models").json()["data"]] == ["base", "ink"]
        add_style(str(work), str(adapters["chalk"]), "chalk", **Q)
        proc.send_signal(signal.SIGHUP)
        t_end, ids = time.time() + 60, []
        while time.time() < t_end:
            ids = [d["id"] for d in httpx.get(url + "/v1/models").json()["data"]]
            if "chalk" in ids:
                break
            time.sleep(0.5)
        assert ids == ["base", "chalk", "ink"]
        assert proc.poll() is None  # SIGHUP reloads; it does not stop the server
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert "SIGHUP reload: styles base, chalk, ink" in err


def test_fp16_swappable_export_keeps_fp32_io_and_states_its_thresholds(adapters, tmp_path):
    import onnx

    from finestyle.runtime.generate import GenerationRequest, decoded_batch, load_backend

    out = tmp_path / "e16"
    r = _cli(
        "export",
        "--swappable",
        "--fp16",
        "--base",
        "builtin:tiny-sd",
        "--adapter",
        str(adapters["ink"]),
        "--name",
        "ink",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "fp16" and {"text_encoder", "unet_kv"} <= set(m["fp16"]["converted"])
    assert m["thresholds"] == {"unet_atol": 2e-2, "image_atol": 3e-2}
    assert all(v["max_abs_diff"] <= v["atol"] for v in m["parity"].values())
    g = onnx.load(str(out / "onnx/unet_kv/model.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in g.graph.initializer)
    assert all(
        i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        for i in g.graph.input
        if i.name.startswith("kv_")
    )
    add_style(str(out), str(adapters["chalk"]), "chalk", **Q)  # proven at the export's own thresholds
    be = load_backend(str(out))
    img = decoded_batch(be, [GenerationRequest("a red boat", steps=2, seed=1, style="chalk")])
    assert np.isfinite(img.numpy()).all() and sorted(be.styles) == ["base", "chalk", "ink"]


def test_tensorrt_profile_of_the_kv_unet_and_refusals_without_tensorrt(swx, adapters, tmp_path):
    """The K/V UNet's engine shapes come from its graph; without TensorRT a swappable TensorRT
    export is refused before any work, and a swappable export without engines says how to get them."""
    import importlib.util

    import torch
    from safetensors.torch import load_file

    from finestyle.export.tensorrt import kv_unet_profile

    shapes = kv_unet_profile(swx / "onnx/unet_kv/model.onnx", (2, 4, 8, 8))
    layers = json.loads((swx / "manifest.json").read_text())["swappable"]["layers"]
    base = load_file(str(swx / "kv/base.safetensors"))
    kv = {k: v for k, v in shapes.items() if k.startswith("kv_")}
    assert shapes["sample"] == (2, 4, 8, 8) and shapes["timestep"] == ()
    assert len(kv) == 2 * len(layers)
    widths = sorted(v.shape[0] for v in base.values() if isinstance(v, torch.Tensor) and v.dim() == 2)
    assert sorted(s[2] for s in kv.values()) == widths and all(s[:2] == (2, 77) for s in kv.values())
    with pytest.raises(UserError, match="no TensorRT engines"):
        load_backend(str(swx), "tensorrt")
    if importlib.util.find_spec("tensorrt") is None:
        r = subprocess.run(
            [sys.executable, "-m", "flows.cli", "export", "--base", "builtin:tiny-sd", "--swappable",
             "--adapter", str(adapters["ink"]), "--format", "tensorrt", "--out", str(tmp_path / "t")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 2 and "TensorRT" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "t").exists()


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_swappable_tensorrt_engines_serve_every_style(adapters, tmp_path):
    """Engines with K/V inputs: the base and each style run on the same engines, added styles need no
    rebuild, and each image matches onnxruntime's (fp32 engines)."""
    from finestyle.config import ExportConfig

    out = tmp_path / "e"
    trt = ExportConfig(base="builtin:tiny-sd", out=str(out), adapter=None, format="tensorrt", trt_size=64)
    run_swappable_export("builtin:tiny-sd", [str(adapters["ink"])], ["ink"], str(out), trt=trt, **Q)
    assert (out / "tensorrt/unet_kv.plan").is_file()
    add_style(str(out), str(adapters["chalk"]), "chalk", **Q)  # no engine rebuild
    ort, eng = load_backend(str(out), "onnxruntime"), load_backend(str(out), "tensorrt")
    for style in ("base", "ink", "chalk"):
        req = GenerationRequest("a red boat", steps=3, seed=1, style=style, width=64, height=64)
        assert np.abs(_arr(generate(ort, req)) - _arr(generate(eng, req))).max() <= 2e-2, style
