"""Inference: backends agree, knobs change the output, neutral settings change nothing, provenance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from finestyle.core.errors import UserError
from finestyle.runtime.generate import GenerationRequest, export_concepts, generate, load_backend
from tests.integration.test_export import adapter  # noqa: F401  (module fixture reuse)


@pytest.fixture(scope="module")
def export_with_base(adapter, tmp_path_factory):  # noqa: F811
    from finestyle.config import ExportConfig
    from finestyle.export.steps import run_export

    out = tmp_path_factory.mktemp("rt") / "e"
    run_export(
        ExportConfig(
            base="builtin:tiny-sd", adapter=str(adapter), out=str(out), device="cpu", with_base_unet=True
        ),
        log=lambda m: None,
    )
    return out


def _arr(imgs):
    return np.stack([np.asarray(i, dtype=np.float32) for i in imgs])


def test_ort_and_torch_agree_and_seed_is_reproducible(export_with_base):
    ort_b = load_backend(str(export_with_base), "onnxruntime")
    pt_b = load_backend(str(export_with_base), "torch")
    req = GenerationRequest("a red boat", steps=4, seed=7)
    a, a2, b = _arr(generate(ort_b, req)), _arr(generate(ort_b, req)), _arr(generate(pt_b, req))
    assert np.array_equal(a, a2)
    assert np.abs(a - b).max() / 255 <= 2e-3 + 1 / 255  # export's image threshold, plus PNG rounding


def test_each_knob_changes_output_and_neutral_changes_nothing(export_with_base):
    be = load_backend(str(export_with_base), "onnxruntime")
    base = _arr(generate(be, GenerationRequest("a red boat", steps=3)))
    assert np.array_equal(
        base, _arr(generate(be, GenerationRequest("a red boat", steps=3, style_guidance=0.0)))
    )
    for change in (
        dict(style_guidance=2.0),
        dict(guidance=1.0),
        dict(negative_prompt="trees"),
        dict(prompt="a red boat and trees"),
        dict(seed=1),
    ):
        kw = dict(prompt="a red boat", steps=3) | change
        assert np.abs(_arr(generate(be, GenerationRequest(**kw))) - base).max() > 0, change
    assert len(generate(be, GenerationRequest("x", steps=2, num_images=2))) == 2


def test_style_guidance_needs_the_base_unet(adapter, tmp_path):  # noqa: F811
    from finestyle.config import ExportConfig
    from finestyle.export.steps import run_export

    out = tmp_path / "e"
    light = dict(check_bf16=False, check_openvino=False, parity_steps=1)  # not under test here
    run_export(
        ExportConfig(base="builtin:tiny-sd", adapter=str(adapter), out=str(out), device="cpu", **light),
        log=lambda m: None,
    )
    be = load_backend(str(out), "onnxruntime")
    with pytest.raises(UserError, match="--with-base-unet"):
        generate(be, GenerationRequest("x", steps=2, style_guidance=1.0))
    # torch with an adapter switches the adapter off for the base prediction instead
    tb = load_backend("builtin:tiny-sd", "torch", adapter=str(adapter))
    a = _arr(generate(tb, GenerationRequest("x", steps=2)))
    b = _arr(generate(tb, GenerationRequest("x", steps=2, style_guidance=3.0)))
    assert np.abs(a - b).max() > 0


def test_cli_generate_both_runtimes_with_provenance(export_with_base, tmp_path):
    files = {}
    for rt in ("onnxruntime", "torch"):
        out = tmp_path / f"{rt}.png"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "finestyle.cli",
                "generate",
                str(export_with_base),
                "a cat",
                "--out",
                str(out),
                "--runtime",
                rt,
                "--steps",
                "3",
                "--seed",
                "5",
                "--exclude-concepts",
                "trees, sun",
            ],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
        )
        assert r.returncode == 0, r.stderr[-1500:]
        im = Image.open(out)
        assert im.text["finestyle:prompt"] == "a cat" and im.text["finestyle:seed"] == "5"
        assert im.text["finestyle:negative_prompt"] == "trees, sun"
        assert len(im.text["finestyle:manifest_sha256"]) == 64 and "FineStyle" in im.text["Software"]
        files[rt] = np.asarray(im, dtype=np.float32)
    assert np.abs(files["onnxruntime"] - files["torch"]).max() <= 2


def test_default_runtime_is_auto_and_says_what_it_chose(export_with_base, tmp_path):
    """No --runtime: the fastest path this machine has that the export verified, named with its reason."""
    from finestyle.runtime.auto import choose_runtime

    choice = choose_runtime(json.loads((export_with_base / "manifest.json").read_text()))
    out = tmp_path / "auto.png"
    r = subprocess.run(
        [sys.executable, "-m", "finestyle.cli", "generate", str(export_with_base), "a cat", "--out", str(out)]
        + ["--steps", "2", "--seed", "5"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-1500:]
    said = Image.open(out).text["finestyle:runtime"]
    assert said.startswith(choice.runtime) and said.endswith(f"(auto: {choice.reason})")
    assert f"(auto: {choice.reason})" in r.stdout + r.stderr


def test_concepts_are_readable_from_the_export(export_with_base):
    c = export_concepts(export_with_base)
    assert c["style"] == "ink" and isinstance(c["concepts"], list) and c["concepts"]
    r = subprocess.run(
        [sys.executable, "-m", "finestyle.cli", "concepts", str(export_with_base)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert r.returncode == 0 and "style: ink" in r.stdout and c["concepts"][0] in r.stdout


def test_schedulers_run_and_stochastic_ones_are_batch_invariant(export_with_base):
    """Every named sampler runs on the ORT backend and changes the image; with a stochastic sampler
    (Euler-a, DDPM) a seed gives the same image alone or batched with other requests."""
    from finestyle.config import SCHEDULERS
    from finestyle.runtime.generate import generate_batch

    be = load_backend(str(export_with_base), "onnxruntime")
    base = _arr(generate(be, GenerationRequest("a red boat", steps=3, seed=3)))
    for name in SCHEDULERS:
        img = _arr(generate(be, GenerationRequest("a red boat", steps=3, seed=3, scheduler=name)))
        assert np.isfinite(img).all() and img.std() > 0, name
        if name != "ddim":  # tiny-sd's own scheduler is DDIM
            assert np.abs(img - base).max() > 0, name
    for name in ("euler_a", "ddpm"):
        a = GenerationRequest("a red boat", steps=3, seed=3, scheduler=name)
        b = GenerationRequest("a blue house", steps=3, seed=9, scheduler=name, num_images=2)
        alone_a, alone_b = _arr(generate(be, a)), _arr(generate(be, b))
        batched = generate_batch(be, [b, a])
        assert np.array_equal(_arr(batched[1]), alone_a), name
        assert np.array_equal(_arr(batched[0]), alone_b), name
    with pytest.raises(UserError, match="unknown scheduler"):
        generate(be, GenerationRequest("x", steps=2, scheduler="nope"))


def test_io_binding_path_gives_the_same_images(export_with_base):
    """The IO-binding code path (on by default for CUDA/TensorRT) run on the CPU device: the same
    images as plain session.run, with and without style guidance (the base UNet is bound too)."""
    from pathlib import Path

    from finestyle.runtime.generate import ort_backend

    plain = ort_backend(Path(export_with_base), ["CPUExecutionProvider"], io_binding=False)
    bound = ort_backend(Path(export_with_base), ["CPUExecutionProvider"], io_binding=True)
    for req in (
        GenerationRequest("a red boat", steps=3, seed=4, num_images=2),
        GenerationRequest("a red boat", steps=3, seed=4, style_guidance=1.5),
    ):
        assert np.array_equal(_arr(generate(plain, req)), _arr(generate(bound, req)))
